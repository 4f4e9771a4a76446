"""How fast a ring notices a lost peer: pccl vs torch.distributed gloo, on loopback.

Per trial, N fresh peer processes all-reduce a float32 tensor (pccl in place or out of place, gloo in
place) in a loop, until one of them (the last rank, the victim) is taken out in the middle of an
operation, half a typical op after it launched it:

- kill: SIGKILL. The kernel closes its sockets, so the survivors can know at once.
- stop: SIGSTOP. Its sockets stay open and silent, as with a hung process or a cut cable; only a
  deadline finds it (pccl: the master's peer timeout; gloo: its process group timeout), both set to
  --timeout.

Figures: from the signal to each survivor's all_reduce raising (median, min, max over survivors and
trials), and for pccl the time until a survivor's call (the retry) returned the right sum on the
smaller ring (a gloo group cannot go on after a failure: every process has to rebuild it). A call
that failed in a later op than the one in flight is counted and said, and so is one that did not
fail at all: a victim that finished its op before the signal is out before the next op is
confirmed, and that op runs on the smaller ring.

    PYTHONPATH=. python benchmarks/failure.py [--world 3] [--size 64MiB] [--trials 5] [--modes kill stop]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import statistics
import time
import traceback

from _membership import wait_for_world
from allreduce import free_port, human, init_gloo, parse_size, quiet_threads

# Ops timed before the victim's last one: the first sets the ring up; the median of the others is
# the "typical op" half of which the victim is given before it is signalled.
WARMUP_OPS = 5
SIGNAL_AT_FRACTION = 0.5
# Bounds on every wait: a trial whose processes do not answer is reported and dropped.
READY_TIMEOUT_S = 120.0     # start-up, warm-up and the victim's launch; the sentinel after a kill
REPORT_MARGIN_S = 60.0      # beyond --timeout: how long survivors try to see the smaller ring
PARENT_MARGIN_S = 15.0      # beyond that: how long the parent waits for their word
RETRY_ATTEMPTS = 50         # failed calls a survivor makes before it gives up


def typical_op_s(op):
    """Run the warm-up ops; the median time of all but the first (which sets the ring up)."""
    times = []
    for _ in range(WARMUP_OPS):
        t = time.perf_counter()
        op()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def _survive(conn, rank, world, op, result_right, can_retry, patience_s):
    """Call `op` until it has run on a ring smaller than `world` (the victim is out), retrying failed
    calls without refilling the input: a failed op must have left it as it was. Report when the first
    call raised (if one did: a peer that dies between two ops may be taken out before the next one is
    confirmed, which then simply runs on the smaller ring), when the smaller ring's result came, and
    whether all of it is right (checked after the clock is read)."""
    index, t_fail, failed_at, error, refill = WARMUP_OPS, None, None, "", True
    deadline = time.monotonic() + patience_s
    for _ in range(RETRY_ATTEMPTS):
        while time.monotonic() < deadline:
            try:
                ring = op(refill)
            except Exception as exc:  # noqa: BLE001 - each library raises its own type
                if t_fail is None:
                    t_fail, failed_at, error = time.monotonic(), index, f"{type(exc).__name__}: {exc}"[:200]
                refill = False
                break
            index, refill = index + 1, True
            if ring < world:
                t_ok = time.monotonic()
                conn.send(("done", rank, t_fail, failed_at, error, t_ok, ring, result_right()))
                return
        if not can_retry or time.monotonic() >= deadline:
            break
    conn.send(("done", rank, t_fail, failed_at, error, None, 0, False))


def pccl_worker(rank, world, port, nbytes, conn, patience_s, in_place):
    quiet_threads()
    try:
        import numpy as np
        import pccl
        comm = pccl.Communicator(f"127.0.0.1:{port}", peer_group=0)
        comm.connect(n_attempts=20)
        wait_for_world(comm, world)
        base = np.full(nbytes // 4, rank + 1, dtype=np.float32)
        buf = base.copy()
        recv = buf if in_place else np.full_like(buf, -1)  # touched, as a caller's would be

        def op(refill=True):
            if refill:
                np.copyto(buf, base)
            return comm.all_reduce(buf, recv, op=pccl.ReduceOp.SUM).local_world_size

        typical = typical_op_s(op)
        if rank == world - 1:
            np.copyto(buf, base)
            handle = comm.all_reduce_async(buf, recv, op=pccl.ReduceOp.SUM)
            conn.send(("launched", rank, time.monotonic(), typical))
            handle.wait()  # the parent signals this process meanwhile
            time.sleep(READY_TIMEOUT_S)
            return
        # Ranks hold 1 .. N; the victim's N is gone. Every element, so a piece restored wrong shows.
        expected = float(sum(range(1, world)))
        _survive(conn, rank, world, op, lambda: bool(np.all(recv == expected)), can_retry=True, patience_s=patience_s)
        comm.close()
    except BaseException:  # noqa: BLE001 - everything goes to the parent
        conn.send(("error", rank, traceback.format_exc()))


def gloo_worker(rank, world, port, nbytes, conn, patience_s, timeout_s):
    quiet_threads()
    try:
        import torch
        dist = init_gloo(rank, world, port, timeout_s)
        base = torch.full((nbytes // 4,), float(rank + 1), dtype=torch.float32)
        buf = base.clone()

        def op(refill=True):
            buf.copy_(base)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            return world

        typical = typical_op_s(op)
        if rank == world - 1:
            buf.copy_(base)
            work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=True)
            conn.send(("launched", rank, time.monotonic(), typical))
            work.wait()
            time.sleep(READY_TIMEOUT_S)
            return
        # A failed gloo group is rebuilt by every process, not retried: there is no smaller ring.
        _survive(conn, rank, world, op, lambda: False, can_retry=False, patience_s=patience_s)
        os._exit(0)  # and a broken one can hang in its teardown
    except BaseException:  # noqa: BLE001
        conn.send(("error", rank, traceback.format_exc()))


def one_trial(library, in_place, mode, args):
    """Start the peers, signal the victim mid-op, gather the survivors' reports; always kill them all."""
    ctx = mp.get_context("spawn")
    patience_s = args.timeout + REPORT_MARGIN_S
    master = None
    if library == "pccl":
        import pccl
        master = pccl.MasterNode("127.0.0.1:0", peer_timeout_s=args.timeout)
        master.run()
        port, target, extra = master.port, pccl_worker, (patience_s, in_place)
    else:
        port, target, extra = free_port(), gloo_worker, (patience_s, args.timeout)
    pipes = [ctx.Pipe(duplex=False) for _ in range(args.world)]
    procs = [ctx.Process(target=target, args=(r, args.world, port, args.size, pipes[r][1]) + extra, daemon=True)
             for r in range(args.world)]
    victim = procs[-1]
    try:
        for p in procs:
            p.start()
        msg = _receive(pipes[-1][0], READY_TIMEOUT_S, "the victim's launch")
        _, _, t_launch, typical = msg
        time.sleep(max(0.0, t_launch + SIGNAL_AT_FRACTION * typical - time.monotonic()))
        t_signal = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
        gone_s = None
        if mode == "kill" and mp.connection.wait([victim.sentinel], timeout=READY_TIMEOUT_S):
            # The kernel frees a killed process's memory before it closes its files, sockets and the
            # sentinel pipe alike: until then nobody can know. Seen from here, late by this process's
            # own wake-up.
            gone_s = time.monotonic() - t_signal
        # The survivors give up after `patience_s` from before the signal and say so: waiting a
        # little longer here hears that rather than a silence.
        reports = [_receive(pipes[r][0], patience_s + PARENT_MARGIN_S, f"survivor {r}")
                   for r in range(args.world - 1)]
    finally:
        try:
            for p in procs:
                if p.pid is None:
                    continue  # never started
                if p.is_alive():
                    p.kill()  # SIGKILL ends a stopped process too
                p.join(timeout=5)
            for reader, writer in pipes:
                reader.close()
                writer.close()
        finally:
            if master is not None:
                master.interrupt()
    out = []
    for _, rank, t_fail, index, error, t_ok, world_after, right in reports:
        out.append({"rank": rank, "fail_s": None if t_fail is None else t_fail - t_signal,
                    "in_flight": index == WARMUP_OPS, "error": error,
                    "retry_s": None if t_ok is None else t_ok - t_signal, "world_after": world_after,
                    "retry_right": right})
    return {"typical_op_s": typical, "gone_s": gone_s, "survivors": out}


def _receive(conn, timeout_s, what):
    if not conn.poll(timeout_s):
        raise TimeoutError(f"no word from {what} within {timeout_s:.0f} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"rank {msg[1]} failed:\n{msg[2]}")
    return msg


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def spread(values, unit_scale, unit):
    return (f"median {statistics.median(values) * unit_scale:.1f} {unit} (min {min(values) * unit_scale:.1f}, "
            f"max {max(values) * unit_scale:.1f})")


def report(label, library, mode, trials, world) -> bool:
    """Print one variant's figures; False if a pccl retry gave up or returned a wrong sum, or a gloo
    call never raised."""
    survivors = [s for t in trials for s in t["survivors"]]
    if not survivors:
        print(f"  {label}: no trial finished")
        return False
    scale, unit = (1e3, "ms") if mode == "kill" else (1.0, "s")
    raised = [s for s in survivors if s["fail_s"] is not None]
    late = sum(not s["in_flight"] for s in raised)
    typical = statistics.median(t["typical_op_s"] for t in trials) * 1e3
    figure = f"raised after {spread([s['fail_s'] for s in raised], scale, unit)}" if raised else "never raised"
    print(f"  {label}: the survivors' call {figure} ({len(raised)} of {plural(len(survivors), 'call')} in "
          f"{plural(len(trials), 'trial')}; typical op {typical:.0f} ms"
          + (f"; {late} failed in the op after the one in flight)" if late else ")"))
    if len(raised) < len(survivors) and library == "pccl":
        print(f"        {len(survivors) - len(raised)} did not fail: the victim was out before their op was "
              f"confirmed, so it ran on the smaller ring")
    elif len(raised) < len(survivors):
        print(f"        {len(survivors) - len(raised)} never raised within {REPORT_MARGIN_S:g} s beyond the timeout")
        return False
    gone = [t["gone_s"] for t in trials if t["gone_s"] is not None]
    if gone:
        print(f"        the victim's sockets closed (its process gone) after {spread(gone, scale, unit)}")
    retried = [s for s in survivors if s["retry_s"] is not None]
    if library == "pccl":
        wrong = [s for s in retried if not s["retry_right"] or s["world_after"] != world - 1]
        figure = spread([s["retry_s"] for s in retried], scale, unit) if retried else "never"
        print(f"        the smaller ring's sum arrived after {figure}; "
              f"{len(survivors) - len(retried)} gave up, {len(wrong)} wrong")
        if wrong or len(retried) < len(survivors):
            return False
    if raised:
        print(f"        first error: {raised[0]['error'][:160]}")
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=3,
                        help="peers per trial, victim included, at least 3 (default %(default)s)")
    parser.add_argument("--size", type=parse_size, default=parse_size("64MiB"),
                        help="bytes of float32 per all-reduce (default 64MiB)")
    parser.add_argument("--trials", type=int, default=5, help="trials per variant and mode (default %(default)s)")
    parser.add_argument("--placement", nargs="+", choices=("in", "out"), default=["in", "out"],
                        help="pccl in place (the failed op restores the input) and/or out of place; gloo: in place")
    parser.add_argument("--modes", nargs="+", choices=("kill", "stop"), default=["kill", "stop"])
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="pccl's peer timeout and gloo's group timeout, seconds (default %(default)s)")
    parser.add_argument("--no-gloo", dest="gloo", action="store_false", help="pccl only")
    args = parser.parse_args(argv)
    # The master runs in this process; its warnings about the peers it drops are what a trial does.
    os.environ.setdefault("PCCL_LOG_LEVEL", "ERR")
    if args.world < 3:
        parser.error("--world must be at least 3: the survivors of one victim need a ring of 2 to go on")
    variants = [(f"pccl {'in place' if p == 'in' else 'out of place'}", "pccl", p == "in") for p in args.placement]
    if args.gloo:
        try:
            import torch.distributed  # noqa: F401
            variants.append(("gloo", "gloo", True))
        except ImportError:
            print("torch is not installed: pccl only")
    failed = False
    for mode in args.modes:
        print(f"== {'SIGKILL' if mode == 'kill' else 'SIGSTOP'} mid-op: {args.world} peers, {human(args.size)}, "
              f"{plural(args.trials, 'trial')}" + (f", timeout {args.timeout:g} s" if mode == "stop" else "") + " ==",
              flush=True)
        for label, library, in_place in variants:
            trials = []
            for _ in range(args.trials):  # one trial at a time: never two sets of peers at once
                try:
                    trials.append(one_trial(library, in_place, mode, args))
                except Exception as exc:  # noqa: BLE001 - keep the other trials
                    print(f"  {label}: a trial failed: {exc}")
                    failed = True
            failed |= not report(label, library, mode, trials, args.world)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
