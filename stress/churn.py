"""``python -m stress.churn``: DiLoCo peers killed, frozen and replaced at random while they train.

    python -m stress.churn --peers 8 --duration 600 [--quantize] [--async] [--seed S]

Starts a master and ``--peers`` DiLoCo peers on loopback and, for ``--duration`` seconds, kills
peers (at random moments, mid-reduce, mid-sync), SIGSTOPs some beyond the peer timeout, sometimes
leaves one peer alone, and starts replacements (the engine is ``pccl._churn``). Prints what it does,
then the figures: outer steps, kills, stops, joins, parity violations, hangs, the longest time
without progress, master crashes, unexpected peer exits. Exit status 1 when any check failed (the
logs are then kept and their directory printed), 130 on Ctrl-C or SIGTERM; every process it started
is killed on the way out either way.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType

from pccl._churn import DEFAULT_HANG_BOUND_S, DEFAULT_PEER_TIMEOUT_S, Action, ChurnConfig, ChurnRun, StepSummary

EXIT_VIOLATIONS = 1
EXIT_INTERRUPTED = 130


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stress.churn", description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8, help="peers alive at most (default %(default)s)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of chaos (default %(default)s)")
    parser.add_argument("--quantize", action="store_true", help="uint8 min-max quantized pseudo-gradient reduces")
    parser.add_argument("--async", dest="asynchronous", action="store_true",
                        help="asynchronous (one-step-delayed) DiLoCo")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the chaos schedule and the peers (default %(default)s)")
    parser.add_argument("--peer-timeout", type=float, default=DEFAULT_PEER_TIMEOUT_S,
                        help="the master's peer timeout in seconds (default %(default)s)")
    parser.add_argument("--hang-bound", type=float, default=DEFAULT_HANG_BOUND_S,
                        help="seconds without progress that count as a hang (default %(default)s)")
    parser.add_argument("--outer-optimizer", choices=("default", "sgd"), default="default",
                        help="DiLoCo's default for the mode (sync: Nesterov SGD, async: SGD 0.5) "
                             "or plain SGD 0.5 (default %(default)s)")
    parser.add_argument("--hidden", type=int, default=ChurnConfig.hidden,
                        help="hidden units of the peers' MLP; more: longer reduces and syncs (default %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=None, help="where peer logs and events go (default: a temp dir)")
    parser.add_argument("--log-level", default="INFO", help="PCCL_LOG_LEVEL of master and peers (default %(default)s)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the log directory when every check passed")
    parser.add_argument("--verbose", action="store_true", help="print every outer step")
    args = parser.parse_args(argv)
    if args.peers < 2:
        parser.error("--peers must be at least 2")
    return args


def print_action(action: Action) -> None:
    detail = f" ({action.detail})" if action.detail else ""
    print(f"[{action.t:7.1f} s] {action.kind:<15} {action.peer}{detail}", flush=True)


def print_step(step: StepSummary) -> None:
    parity = "OK" if step.identical == step.peers else "MISMATCH"
    print(f"[{step.t:7.1f} s] step {step.step:5d}  world {step.world}  loss {step.loss:.5f}  "
          f"parity {parity} ({step.identical}/{step.peers})", flush=True)


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = ChurnConfig(peers=args.peers, duration_s=args.duration, asynchronous=args.asynchronous,
                         quantize=args.quantize, seed=args.seed, peer_timeout_s=args.peer_timeout,
                         hang_bound_s=args.hang_bound, hidden=args.hidden, outer_optimizer=args.outer_optimizer,
                         log_level=args.log_level, log_dir=args.log_dir)
    signal.signal(signal.SIGTERM, raise_interrupt)  # run the cleanup below on SIGTERM too
    print(f"churn: {config.describe()}", flush=True)
    try:
        with ChurnRun(config, on_step=print_step if args.verbose else None, on_action=print_action) as run:
            print(f"churn: logs in {run.result.log_dir}", flush=True)
            result = run.run()
    except KeyboardInterrupt:
        print("churn: interrupted; every process it started was killed", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(result.summary())
    if not result.ok:
        return EXIT_VIOLATIONS
    if not args.keep_logs and args.log_dir is None:
        shutil.rmtree(result.log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
