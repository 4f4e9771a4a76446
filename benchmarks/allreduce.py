"""All-reduce benchmark on one machine over loopback: pccl (in-place, out-of-place) vs torch.distributed gloo.

Per world size N: a pccl master in this process and N spawned peers; once they are gone, N gloo
processes (all_reduce SUM in place) run the same sizes, so the two never compete for the CPU.
Every op is timed on every peer with perf_counter; the figure reported is the median over peers of
each peer's median. A third set of N processes measures the floor under any TCP ring: the bytes a ring
all-reduce moves, sent and received over loopback TCP with nothing else done (--no-floor skips it).
Bus bandwidth = 2(N-1)/N * bytes / time. "Extra memory" is a peer's peak RSS
beyond its own buffers: /proc/self/clear_refs is reset after the buffers are allocated and touched,
then extra = VmHWM after the ops - VmRSS right after the reset (max over peers).

    PYTHONPATH=. python benchmarks/allreduce.py [--world 2 3 4] [--sizes 4KiB 1MiB ...] [--pool 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import re
import socket
import statistics
import time
import traceback

from _membership import wait_for_world

DEFAULT_SIZES = ["4KiB", "1MiB", "16MiB", "64MiB", "256MiB"]
UNITS = {u + s: 1 << 10 * i for i, u in enumerate("KMG", 1) for s in ("", "IB", "B")} | {"": 1, "B": 1}
# Untimed ops before timing, for both libraries: the first is the start barrier (and pccl's ring set-up);
# pccl's next few still grow TCP buffers and fill its buffer caches, and a run measures steady state.
WARMUP = 4
# The floor's processes: how long a rank waits for its ring neighbours to listen and connect, and
# for its sender thread to end.
FLOOR_CONNECT_TIMEOUT_S = 60
FLOOR_JOIN_TIMEOUT_S = 10


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use bytes or a KiB/MiB/GiB suffix)")
    nbytes = int(m.group(1)) * UNITS[m.group(2).upper()]
    if nbytes < 4 or nbytes % 4:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 4 bytes (float32)")
    return nbytes


def default_reps(nbytes: int) -> int:
    return 20 if nbytes <= 1 << 20 else 10 if nbytes <= 64 << 20 else 5


def human(nbytes: float) -> str:
    unit = 0
    while abs(nbytes) >= 1024 and unit < 3:
        nbytes, unit = nbytes / 1024, unit + 1
    return f"{nbytes:.0f} B" if unit == 0 else f"{nbytes:.1f} {'KMG'[unit - 1]}iB"


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "?"
    return f"{platform.node()}: nproc={os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}), cpu={model}"


# ---- peak memory (runs in the workers) --------------------------------------------------------------

def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))


class PeakMem:
    """Peak RSS above the RSS at start(); falls back to VmHWM deltas when clear_refs is refused."""

    def start(self) -> PeakMem:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                self.exact = f.write("5") == 1
        except OSError:
            self.exact = False
        self.base, self.hwm0 = _vm("VmRSS"), _vm("VmHWM")
        return self

    def extra(self) -> int:
        hwm = _vm("VmHWM")
        return hwm - self.base if self.exact else max(0, hwm - max(self.hwm0, self.base))


# ---- workers ----------------------------------------------------------------------------------------

def run_sizes(rank: int, world: int, sizes: list[int], reps_override: int | None, modes, op_fn, make,
              verify: bool = True):
    """Time op_fn over every size and mode; the first warm-up op doubles as the start barrier."""
    out = {}
    for nbytes in sizes:
        reps = reps_override or default_reps(nbytes)
        for mode in modes:
            send, recv = make(nbytes // 4, rank, mode)
            mem, times = PeakMem().start(), []
            for i in range(WARMUP + reps):
                t0 = time.perf_counter()
                op_fn(send, recv)
                if i >= WARMUP:
                    times.append(time.perf_counter() - t0)
                elif i == 0 and verify:
                    expected = world * (world + 1) / 2
                    if float(recv[-1]) != expected:
                        raise RuntimeError(f"{mode} {nbytes} B: got {float(recv[-1])}, expected {expected}")
            out[(nbytes, mode)] = {"times": times, "extra": mem.extra(), "exact_mem": mem.exact}
            del send, recv
    return out


def quiet_threads() -> None:
    """numpy's BLAS and torch's pools must not spin on the 2 cores the benchmark measures."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def pccl_worker(rank, world, port, sizes, pool, reps, q):
    quiet_threads()
    try:
        import numpy as np
        import pccl
        comm = pccl.Communicator(f"127.0.0.1:{port}", peer_group=0, p2p_connection_pool_size=pool)
        comm.connect(n_attempts=20)
        wait_for_world(comm, world)

        def make(count, rank, mode):
            send = np.full(count, rank + 1, dtype=np.float32)
            recv = send if mode == "in" else np.full(count, -1, dtype=np.float32)  # touched (not calloc)
            return send, recv

        def op(send, recv):
            comm.all_reduce(send, recv, op=pccl.ReduceOp.SUM, tag=0)

        q.put(("ok", rank, run_sizes(rank, world, sizes, reps, ("in", "out"), op, make)))
        comm.close()
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put(("error", rank, traceback.format_exc()))


def init_gloo(rank, world, port, timeout_s):
    """Join torch.distributed's gloo group of `world` ranks that meet at 127.0.0.1:port; returns
    torch.distributed. `timeout_s` bounds the rendezvous and every collective."""
    import datetime
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dist


def gloo_worker(rank, world, port, sizes, pool, reps, q):
    quiet_threads()
    try:
        import torch
        dist = init_gloo(rank, world, port, timeout_s=120)

        def make(count, rank, mode):
            t = torch.full((count,), float(rank + 1), dtype=torch.float32)
            return t, t

        def op(send, recv):
            dist.all_reduce(send, op=dist.ReduceOp.SUM)

        q.put(("ok", rank, run_sizes(rank, world, sizes, reps, ("in",), op, make)))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        q.put(("error", rank, traceback.format_exc()))


def tcp_floor_worker(rank, world, ports, sizes, pool, reps, q):
    """No all-reduce at all: each rank sends the bytes a ring all-reduce must send, 2(N-1)/N x size, to the
    next rank over one loopback TCP connection and receives as many from the previous one, with one
    blocking send and one MSG_WAITALL receive per op (the kernel does all the work; no reduction, no
    framing). What this takes is the floor under a TCP ring of one connection per neighbour (gloo's,
    and pccl's at --pool 1) on this machine: on few cores, where the kernel's copies bind."""
    quiet_threads()
    try:
        import threading
        import numpy as np
        lsock = socket.create_server(("127.0.0.1", ports[rank]))
        deadline = time.monotonic() + FLOOR_CONNECT_TIMEOUT_S
        while True:
            try:
                out = socket.create_connection(("127.0.0.1", ports[(rank + 1) % world]), timeout=FLOOR_CONNECT_TIMEOUT_S)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        lsock.settimeout(FLOOR_CONNECT_TIMEOUT_S)
        inc, _ = lsock.accept()
        for s in (out, inc):
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        todo, done = queue.SimpleQueue(), queue.SimpleQueue()

        def sender():
            while (buf := todo.get()) is not None:
                out.sendall(buf)
                done.put(None)

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()

        def make(count, rank, mode):
            nbytes = 2 * (world - 1) * count * 4 // world
            return np.full(nbytes, rank + 1, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)

        def op(send, recv):
            todo.put(memoryview(send))
            view, got = memoryview(recv), 0
            while got < len(view):
                n = inc.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
                if n == 0:
                    raise ConnectionError("the previous rank closed its connection")
                got += n
            done.get()

        q.put(("ok", rank, run_sizes(rank, world, sizes, reps, ("in",), op, make, verify=False)))
        todo.put(None)
        thread.join(timeout=FLOOR_JOIN_TIMEOUT_S)
        for s in (out, inc, lsock):
            s.close()
    except BaseException:  # noqa: BLE001
        q.put(("error", rank, traceback.format_exc()))


# ---- orchestration ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(target, world, port, args, timeout):
    """Run `world` workers, gather their results (or raise), always kill them all at the end."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, args.sizes, args.pool, args.reps, q), daemon=True)
             for r in range(world)]
    results, deadline = {}, time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        while len(results) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target.__name__}: no result after {timeout:.0f} s from ranks "
                                   f"{sorted(set(range(world)) - set(results))}")
            try:
                status, rank, payload = q.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{target.__name__}: a worker died (exit codes {dead})") from None
                continue
            if status != "ok":
                raise RuntimeError(f"{target.__name__} rank {rank} failed:\n{payload}")
            results[rank] = payload
        return [results[r] for r in range(world)]
    finally:
        for p in procs:  # a clean run lets the workers close their communicators; anything left is killed
            p.join(timeout=10 if len(results) == world else 0.1)
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        q.close()


def summarize(per_rank, nbytes, mode, world):
    med = statistics.median(statistics.median(r[(nbytes, mode)]["times"]) for r in per_rank)
    return {"median_s": med, "busbw_gbps": 2 * (world - 1) / world * nbytes * 8 / med / 1e9,
            "extra_mem": max(r[(nbytes, mode)]["extra"] for r in per_rank),
            "exact_mem": all(r[(nbytes, mode)]["exact_mem"] for r in per_rank),
            "per_rank_times": [r[(nbytes, mode)]["times"] for r in per_rank]}


def run_pccl(world, args):
    import pccl
    master = pccl.MasterNode("127.0.0.1:0")
    master.run()
    try:
        res = launch(pccl_worker, world, master.port, args, args.timeout)
    finally:
        master.interrupt()
    return {nbytes: {m: summarize(res, nbytes, m, world) for m in ("in", "out")} for nbytes in args.sizes}


def merge_rounds(rounds, world, nbytes):
    """One figure per size and mode: the median over rounds; memory: the worst round."""
    med = statistics.median(r["median_s"] for r in rounds)
    return {"median_s": med, "busbw_gbps": 2 * (world - 1) / world * nbytes * 8 / med / 1e9,
            "extra_mem": max(r["extra_mem"] for r in rounds), "exact_mem": all(r["exact_mem"] for r in rounds),
            "rounds_s": [r["median_s"] for r in rounds]}


def run_world(world, args, have_torch):
    """pccl and gloo take turns, `--rounds` times (A B A B ...), so a slow spell of this shared machine
    hits both; each figure is the median over rounds."""
    per_round: list[dict] = []
    for _ in range(args.rounds):
        row = run_pccl(world, args)
        if have_torch:
            try:
                res = launch(gloo_worker, world, free_port(), args, args.timeout)
                for nbytes in args.sizes:
                    row[nbytes]["gloo"] = summarize(res, nbytes, "in", world)
            except Exception as exc:  # noqa: BLE001 - keep the pccl figures
                print(f"  gloo failed for world {world}: {exc}")
        if args.floor:
            try:
                res = launch(tcp_floor_worker, world, [free_port() for _ in range(world)], args, args.timeout)
                for nbytes in args.sizes:
                    row[nbytes]["floor"] = summarize(res, nbytes, "in", world)
            except Exception as exc:  # noqa: BLE001 - keep the other figures
                print(f"  the TCP floor failed for world {world}: {exc}")
        per_round.append(row)
    merged = {}
    for nbytes in args.sizes:
        merged[nbytes] = {mode: merge_rounds([r[nbytes][mode] for r in per_round], world, nbytes)
                          for mode in per_round[0][nbytes] if all(mode in r[nbytes] for r in per_round)}
    return merged


def print_table(world, row):
    cols = ["size", "pccl in ms", "in Gbit/s", "pccl out ms", "out Gbit/s", "gloo ms", "gloo Gbit/s",
            "pccl/gloo in|out", "pccl extra mem in | out", "gloo extra mem", "tcp floor ms", "gloo/floor"]
    lines = []
    for nbytes, r in row.items():
        def mem(m):
            return f"{human(m['extra_mem'])} ({m['extra_mem'] / nbytes:.2f}x){'' if m['exact_mem'] else '~'}"
        g, fl = r.get("gloo"), r.get("floor")
        lines.append([human(nbytes), f"{r['in']['median_s'] * 1e3:.3f}", f"{r['in']['busbw_gbps']:.2f}",
                      f"{r['out']['median_s'] * 1e3:.3f}", f"{r['out']['busbw_gbps']:.2f}",
                      f"{g['median_s'] * 1e3:.3f}" if g else "-", f"{g['busbw_gbps']:.2f}" if g else "-",
                      f"{r['in']['busbw_gbps'] / g['busbw_gbps']:.2f}|{r['out']['busbw_gbps'] / g['busbw_gbps']:.2f}x"
                      if g else "-",
                      f"{mem(r['in'])} | {mem(r['out'])}", mem(g) if g else "-",
                      f"{fl['median_s'] * 1e3:.3f}" if fl else "-",
                      f"{g['median_s'] / fl['median_s']:.2f}x" if g and fl else "-"])
    widths = [max(len(c), *(len(ln[i]) for ln in lines)) for i, c in enumerate(cols)]
    print(f"\n== world {world} ==")
    print(" | ".join(c.rjust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for ln in lines:
        print(" | ".join(c.rjust(w) for c, w in zip(ln, widths)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 3, 4], help="peer counts (each >= 2)")
    ap.add_argument("--sizes", type=parse_size, nargs="+", default=[parse_size(s) for s in DEFAULT_SIZES],
                    help="tensor sizes in bytes, or with a KiB/MiB/GiB suffix")
    ap.add_argument("--pool", type=int, default=1, help="pccl p2p_connection_pool_size (default 1, as in the README table; 0: the library default, 16)")
    ap.add_argument("--reps", type=int, help="timed repetitions per size (default 20 <= 1 MiB, 10 <= 64 MiB, else 5)")
    ap.add_argument("--rounds", type=int, default=3, help="alternate pccl and gloo this many times (median)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per world size and library")
    ap.add_argument("--no-gloo", action="store_true", help="run pccl only")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the raw TCP floor (the ring's bytes over loopback TCP, no reduction)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw figures here")
    ap.add_argument("--send-thread", choices=["auto", "on", "off"],
                    help="PCCL_SEND_THREAD for the pccl peers (default: as set, else auto: a writer thread with >= 4 cores)")
    args = ap.parse_args()
    if args.send_thread:
        os.environ["PCCL_SEND_THREAD"] = args.send_thread  # the spawned peers inherit it
    if min(args.world) < 2:
        ap.error("--world sizes must be >= 2")
    have_torch = False
    if not args.no_gloo:
        try:
            import torch.distributed as dist
            have_torch = dist.is_available() and dist.is_gloo_available()
        except ImportError:
            pass
        if not have_torch:
            print("torch (with torch.distributed gloo) is not installed: running pccl only")
    print(machine())
    import pccl._core as core
    print(f"pccl writes frames on {'a thread of their own' if core.send_thread_enabled() else 'the reactor thread'} "
          f"(PCCL_SEND_THREAD={os.environ.get('PCCL_SEND_THREAD', 'auto')})")
    print(f"pool={args.pool}, rounds={args.rounds}, warm-up={WARMUP}, reps={args.reps or '20/10/5 by size (<=1 MiB, <=64 MiB, more)'}; times are the median "
          f"over peers of each peer's median; pccl/gloo = pccl bus bandwidth (in|out) / gloo's; "
          f"extra mem = max over peers ('~': VmHWM-delta fallback); tcp floor = the ring's bytes alone over "
          f"loopback TCP (no reduction, no framing), so gloo/floor bounds what any TCP ring can gain over gloo")
    report, failed = {"machine": machine(), "pool": args.pool, "send_thread": core.send_thread_enabled(), "worlds": {}}, False
    for world in args.world:
        t0 = time.monotonic()
        try:
            row = run_world(world, args, have_torch)
        except Exception as exc:  # noqa: BLE001 - go on with the next world size
            print(f"\n== world {world} ==\npccl failed: {exc}", flush=True)
            failed = True
            continue
        print_table(world, row)
        print(f"(world {world} took {time.monotonic() - t0:.0f} s)", flush=True)
        report["worlds"][world] = {str(n): r for n, r in row.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"raw figures written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
