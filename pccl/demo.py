"""``python -m pccl.demo``: a master and 4 peers on loopback train a small model with asynchronous
DiLoCo while peers are killed and started at random.

After every outer step it prints the loss of the shared parameters, the ring's world size and a
bit-parity check of every peer that reported the step (the hash of its shared state); at the end it
writes a PNG plot of loss and world size over time and prints a summary. Kills land at random
moments, right after a peer launched its pseudo-gradient reduce, or inside a shared-state sync;
replacements start a few seconds later and catch up from the others. Exit status 0 when every check
passed (parity, no hang, master alive, no peer failing on its own), 1 when one failed, 2 when torch
or matplotlib is missing, 130 on Ctrl-C or SIGTERM (every process it started is killed either way).

The run is ``pccl._churn`` (the engine of ``python -m stress.churn``) with a gentler chaos profile.
The outer optimizer is DiLoCo's default for asynchronous mode, plain SGD with lr 0.5 (Nesterov
momentum diverges when each pseudo-gradient lands one phase late). Needs PyTorch and matplotlib:
``pip install ".[demo]"``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType

from pccl._churn import Action, ChaosProfile, ChurnConfig, ChurnResult, ChurnRun, Disruption, StepSummary

DEFAULT_DURATION_S = 45.0
DEFAULT_PEERS = 4
DEFAULT_PLOT = Path("pccl-demo.png")
# Kills and restarts only: the demo shows training going on through them.
DEMO_CHAOS = ChaosProfile(min_interval_s=2.0, max_interval_s=5.0,
                          weights=((Disruption.KILL, 3.0), (Disruption.KILL_IN_REDUCE, 2.0),
                                   (Disruption.KILL_IN_SYNC, 2.0)))
# 10 inner steps of ~30 ms per outer step: about three outer steps a second, readable as it scrolls.
DEMO_INNER_STEPS = 10
DEMO_INNER_STEP_SLEEP_S = 0.03
PLOT_SIZE_INCHES = (10, 6)
PLOT_DPI = 100
EXIT_FAILED = 1
EXIT_MISSING_DEPENDENCY = 2
EXIT_INTERRUPTED = 130

# How the engine's actions read in the demo ("kill" is also how the engine reports killing a peer that
# did not reach the point it was told to die at).
_ACTION_WORDS = {
    "start": "started",
    Disruption.KILL.value: "killed (SIGKILL)",
    Disruption.KILL_IN_REDUCE.value: "told to SIGKILL itself right after launching its reduce",
    Disruption.KILL_IN_SYNC.value: "told to SIGKILL itself inside a shared-state sync",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pccl.demo", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S,
                        help="seconds of training (default %(default)s)")
    parser.add_argument("--peers", type=int, default=DEFAULT_PEERS, help="peers alive at most (default %(default)s)")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="where the PNG goes (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kills and the peers (default %(default)s)")
    args = parser.parse_args(argv)
    if args.peers < 2:
        parser.error("--peers must be at least 2")
    return args


def missing_dependencies() -> list[str]:
    return [module for module in ("torch", "matplotlib") if importlib.util.find_spec(module) is None]


def print_step(step: StepSummary) -> None:
    verdict = "OK" if step.identical == step.peers else "MISMATCH"
    print(f"step {step.step:4d}  world {step.world}  loss {step.loss:.4f}  parity {verdict} "
          f"({step.identical}/{step.peers} peers identical)", flush=True)


def print_action(action: Action) -> None:
    if action.kind in _ACTION_WORDS:
        print(f"--- {action.peer} {_ACTION_WORDS[action.kind]} at {action.t:.1f} s", flush=True)


def plot(result: ChurnResult, path: Path) -> None:
    """Validation loss (log scale) and world size against time, kills marked, into a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    applied = [s for s in result.steps if s.world > 0]
    kills = [a.t for a in result.actions if a.kind in _ACTION_WORDS and a.kind != "start"]
    fig, (loss_axes, world_axes) = plt.subplots(2, 1, sharex=True, figsize=PLOT_SIZE_INCHES)
    loss_axes.plot([s.t for s in result.steps], [s.loss for s in result.steps], color="tab:blue")
    loss_axes.set_yscale("log")
    loss_axes.set_ylabel("validation loss (shared parameters)")
    loss_axes.set_title(f"pccl: asynchronous DiLoCo, {result.config.peers} peers at most, killed and restarted "
                        f"at random ({sum(result.kills.values())} kills)")
    world_axes.step([s.t for s in applied], [s.world for s in applied], where="post", color="tab:green",
                    label="ring world size of each applied outer step")
    world_axes.step([t for t, _ in result.population], [n for _, n in result.population], where="post",
                    color="tab:gray", linestyle="--", label="peer processes alive")
    world_axes.plot(kills, [0.2] * len(kills), "rx", label="kill")
    world_axes.set_ylim(0, result.config.peers + 2)  # room for the legend above the lines
    world_axes.set_ylabel("peers")
    world_axes.set_xlabel("seconds")
    world_axes.legend(loc="upper left", ncol=3, fontsize="small")
    for axes in (loss_axes, world_axes):
        axes.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def print_summary(result: ChurnResult, plot_path: Path) -> None:
    mismatched = sum(s.identical != s.peers for s in result.steps)
    loss = f"; loss {result.steps[0].loss:.4f} -> {result.steps[-1].loss:.4f}" if result.steps else ""
    kills = result.kills
    print(f"summary: {result.outer_steps} outer steps in {result.elapsed_s:.0f} s{loss}")
    print(f"  peers killed {sum(kills.values())} (at random {kills['random']}, mid-reduce {kills['reduce']}, "
          f"mid-sync {kills['sync']}), processes started {result.started}, joins {result.joins}")
    print(f"  parity: {result.parity_checked_steps} steps compared across >= 2 peers, {mismatched} with a mismatch; "
          f"hangs {len(result.hangs)} (longest wait {result.longest_stall_s:.1f} s), master crashes "
          f"{len(result.master_crashes)}, unexpected peer exits {len(result.unexpected_exits)}")
    print(f"  plot: {plot_path.resolve()}")


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_dependencies()
    if missing:
        print(f"python -m pccl.demo needs PyTorch and matplotlib ({', '.join(missing)} missing): "
              f"pip install \".[demo]\"", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    config = ChurnConfig(peers=args.peers, duration_s=args.duration, asynchronous=True, seed=args.seed,
                         inner_steps=DEMO_INNER_STEPS, inner_step_sleep_s=DEMO_INNER_STEP_SLEEP_S,
                         outer_optimizer="default", chaos=DEMO_CHAOS)
    signal.signal(signal.SIGTERM, raise_interrupt)  # kill the peers on SIGTERM too
    print(f"pccl demo: a master and {args.peers} peers on loopback train an MLP with asynchronous DiLoCo for "
          f"{args.duration:g} s; peers are killed and started at random", flush=True)
    try:
        with ChurnRun(config, on_step=print_step, on_action=print_action) as run:
            result = run.run()
    except KeyboardInterrupt:
        print("pccl demo: interrupted; every process it started was killed", file=sys.stderr)
        return EXIT_INTERRUPTED
    plot(result, args.plot)
    print_summary(result, args.plot)
    if not result.ok:
        print(result.summary())
        return EXIT_FAILED
    shutil.rmtree(result.log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
