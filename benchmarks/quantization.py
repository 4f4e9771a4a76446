"""Quantized all-reduce benchmark: speed on loopback and on a shaped 1 Gbit/s link, error, many small ops.

Sections (all by default; figures are printed, never asserted):
  loopback     64 MiB float32 SUM, N = 2, 3: unquantized, uint8/uint16 MIN_MAX, uint8 ZERO_POINT_SCALE,
               alternated A B C D A B C D ... in every round; median time, bus bandwidth, tx bytes per peer.
  shaped       two network namespaces joined by a veth pair, tbf 1 Gbit/s each way; master and peer 0 in one,
               peer 1 in the other; 64 MiB, unquantized vs uint8 MIN_MAX (needs root and `ip netns`).
  error        relative L2 error of quantized SUM and AVG vs the exact float64 result, N = 2..8, N(0,1) data.
  concurrency  N = 2: 1024 x 16 KiB one after another, the same with 16 in flight, one 16 MiB op.
Bus bandwidth (logical, of the float32 payload) = 2(N-1)/N * bytes / time; times are the median over peers
of each peer's median. Peers are subprocesses of this script (`--peer JSON`; under `ip netns exec` when shaped).

    PYTHONPATH=. python benchmarks/quantization.py [--sections loopback shaped error concurrency] [--rounds 5]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from _membership import wait_for_world

MIB = 1 << 20
QUANT = {"none": None, "u8 min-max": ("UINT8", "MIN_MAX"), "u16 min-max": ("UINT16", "MIN_MAX"),
         "u8 zero-point": ("UINT8", "ZERO_POINT_SCALE")}
SEED = 1234


# ---- peers (run as `quantization.py --peer JSON`) -----------------------------------------------------

def qopts(name):
    import pccl
    spec = QUANT[name]
    return spec and pccl.QuantizationOptions(pccl.DataType[spec[0]], pccl.QuantizationAlgorithm[spec[1]])


def peer_main(cfg: dict) -> None:
    import numpy as np
    import pccl
    comm = pccl.Communicator(cfg["addr"], peer_group=0, p2p_connection_pool_size=1)
    comm.connect(n_attempts=30)
    wait_for_world(comm, cfg["world"])
    rank, world, SUM, out = cfg["rank"], cfg["world"], pccl.ReduceOp.SUM, {}
    data = lambda r, n: np.random.default_rng(SEED + r).standard_normal(n, dtype=np.float32)  # noqa: E731
    if cfg["task"] == "timing":  # variants alternate within every round; the first pass is a warm-up
        x, y = data(rank, cfg["bytes"] // 4), np.zeros(cfg["bytes"] // 4, np.float32)  # out of place
        out = {"times": {v: [] for v in cfg["variants"]}, "tx": {}}
        for rnd in range(cfg["rounds"] + 1):
            for v in cfg["variants"]:
                for _ in range(cfg["reps"] if rnd else 1):
                    t0 = time.perf_counter()
                    info = comm.all_reduce(x, y, op=SUM, tag=0, quantization_options=qopts(v))
                    if rnd:
                        out["times"][v].append(time.perf_counter() - t0)
                    out["tx"][v] = max(out["tx"].get(v, 0), info.tx_bytes)  # max: a last op may report 0
    elif cfg["task"] == "error":
        n = 1 << 20
        x, y = data(rank, n), np.zeros(n, np.float32)
        exact = np.zeros(n, np.float64)
        for r in range(world):
            exact += data(r, n)
        for v in cfg["variants"]:
            for op in ("SUM", "AVG"):
                comm.all_reduce(x, y, op=pccl.ReduceOp[op], tag=0, quantization_options=qopts(v))
                ref = exact if op == "SUM" else exact / world
                out[f"{v}|{op}"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    elif cfg["task"] == "concurrency":
        small, count, window = 4096, 1024, 16  # 16 KiB of float32; 1024 of them = 16 MiB
        xs = [data(rank * 100 + i, small) for i in range(window)]
        ys = [np.zeros(small, np.float32) for _ in range(window)]
        big, big_y = data(rank, small * count), np.zeros(small * count, np.float32)

        def check(result):
            if not result[0]:
                raise RuntimeError(f"async all-reduce failed: status {result[1]}")

        def sequential():
            for i in range(count):
                comm.all_reduce(xs[i % window], ys[i % window], op=SUM, tag=0)

        def in_flight():  # op i reuses the tag of op i - window, which was waited for just before
            pending: collections.deque = collections.deque()
            for i in range(count):
                if len(pending) == window:
                    check(pending.popleft().wait())
                pending.append(comm.all_reduce_async(xs[i % window], ys[i % window], op=SUM, tag=i % window))
            while pending:
                check(pending.popleft().wait())

        variants = {"1024 x 16 KiB, sequential": sequential, "1024 x 16 KiB, 16 in flight": in_flight,
                    "1 x 16 MiB": lambda: comm.all_reduce(big, big_y, op=SUM, tag=0)}
        out = {"times": {v: [] for v in variants}}
        for rnd in range(cfg["rounds"] + 1):
            for v, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                if rnd:
                    out["times"][v].append(time.perf_counter() - t0)
    print("RESULT " + json.dumps(out), flush=True)
    comm.close()


# ---- orchestration ------------------------------------------------------------------------------------

def peer_env() -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if env.get("PYTHONPATH"):  # absolute, so that it survives any change of directory
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return env


def run_peers(cfgs: list[dict], prefixes: list[list[str]], timeout: float) -> list[dict]:
    """Start one peer per cfg (argv prefixed, e.g. by `ip netns exec NS`), collect each one's RESULT line."""
    procs = []  # (process, stdout file, stderr file)
    try:
        for cfg, prefix in zip(cfgs, prefixes):
            out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # files never fill up like pipes
            argv = prefix + [sys.executable, os.path.abspath(__file__), "--peer", json.dumps(cfg)]
            procs.append((subprocess.Popen(argv, stdout=out, stderr=err, env=peer_env()), out, err))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p, _, _ in procs):
            if any(p.poll() not in (None, 0) for p, _, _ in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        results = []
        for i, (p, out, err) in enumerate(procs):
            out.seek(0), err.seek(0)
            lines = [ln for ln in out.read().decode().splitlines() if ln.startswith("RESULT ")]
            if p.poll() != 0 or not lines:
                state = "timed out" if p.poll() is None else f"exit {p.returncode}"
                raise RuntimeError(f"peer {i} {state}:\n{err.read().decode()[-3000:]}")
            results.append(json.loads(lines[-1][7:]))
        return results
    finally:
        for p, out, err in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=5)
            out.close(), err.close()


def loopback_peers(world: int, task: dict, timeout: float) -> list[dict]:
    import pccl
    master = pccl.MasterNode("127.0.0.1:0")
    master.run()
    try:
        cfgs = [dict(task, addr=f"127.0.0.1:{master.port}", rank=r, world=world) for r in range(world)]
        return run_peers(cfgs, [[]] * world, timeout)
    finally:
        master.interrupt()


def median_time(results: list[dict], variant: str) -> float:
    return statistics.median(statistics.median(r["times"][variant]) for r in results)


def busbw(world: int, nbytes: int, seconds: float) -> float:
    return 2 * (world - 1) / world * nbytes * 8 / seconds / 1e9


def table(cols: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print(" | ".join(c.rjust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)), flush=True)


def timing_rows(results: list[dict], world: int, nbytes: int, variants: list[str]) -> list[list[str]]:
    base, base_tx, rows = median_time(results, "none"), statistics.mean(r["tx"]["none"] for r in results), []
    for v in variants:
        t, tx = median_time(results, v), statistics.mean(r["tx"][v] for r in results)
        rows.append([str(world), v, f"{t * 1e3:.1f}", f"{busbw(world, nbytes, t):.2f}", f"{base / t:.2f}x",
                     f"{tx / MIB:.2f}", f"{tx / base_tx:.3f}", f"{tx * 8 / t / 1e9:.2f}"])
    return rows


TIMING_COLS = ["N", "variant", "median ms", "logical Gbit/s", "speedup vs none", "tx MiB/peer", "tx vs none",
               "wire Gbit/s/peer"]  # wire: tx_bytes (payload, no frame headers) per second


def section_loopback(args) -> None:
    print(f"\n== loopback: 64 MiB float32 SUM, {args.rounds} rounds x {args.reps} reps, variants alternated ==")
    variants, rows = list(QUANT), []
    for world in (2, 3):
        task = {"task": "timing", "bytes": 64 * MIB, "variants": variants, "rounds": args.rounds, "reps": args.reps}
        rows += timing_rows(loopback_peers(world, task, args.timeout), world, 64 * MIB, variants)
    table(TIMING_COLS, rows)
    print("(PCCL 1.0: its min-max is 1.8-2.0x slower than its unquantized op on loopback, i.e. 0.50-0.56x)")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=30)


def iperf(ns_a: str, ns_b: str, addr_b: str) -> str:
    if not shutil.which("iperf3"):
        return "iperf3 not installed: link not calibrated"
    server = subprocess.Popen(["ip", "netns", "exec", ns_b, "iperf3", "-s", "-B", addr_b],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        figures = []
        for label, extra in (("a->b", []), ("b->a", ["-R"])):
            for _ in range(20):  # the server needs a moment to listen, and to finish the previous test
                res = sh("ip", "netns", "exec", ns_a, "iperf3", "-c", addr_b, "-t", "3", "-J", *extra, check=False)
                report = json.loads(res.stdout or "{}")
                if res.returncode == 0 and "sum_received" in report.get("end", {}):
                    break
                time.sleep(0.5)
            bps = report.get("end", {}).get("sum_received", {}).get("bits_per_second")
            figures.append(f"{label} {bps / 1e9:.3f} Gbit/s" if bps else f"{label} failed ({report.get('error')})")
        return "iperf3 (3 s, one TCP flow): " + ", ".join(figures)
    finally:
        server.terminate()
        server.wait(timeout=5)


def section_shaped(args) -> None:
    tbf = ["tbf", "rate", "1gbit", "burst", args.tbf_burst, "latency", args.tbf_latency]
    print(f"\n== shaped link: veth between two namespaces, each end `{' '.join(tbf)}`; 64 MiB float32 SUM, N = 2, "
          f"{args.rounds} rounds x {args.shaped_reps} reps ==")
    pid = os.getpid()
    ns_a, ns_b, dev_a, dev_b = f"pcclq-{pid}-a", f"pcclq-{pid}-b", f"pq{pid}a", f"pq{pid}b"
    subnet = f"10.211.{pid % 250}"
    addr_a, addr_b = f"{subnet}.1", f"{subnet}.2"
    created, master = [], None
    try:
        if os.geteuid() != 0:
            raise PermissionError("not root")
        for ns in (ns_a, ns_b):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        sh("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            for cmd in (["ip", "addr", "add", f"{addr}/30", "dev", dev], ["ip", "link", "set", dev, "up"],
                        ["ip", "link", "set", "lo", "up"], ["tc", "qdisc", "add", "dev", dev, "root", *tbf]):
                sh(cmd[0], "-n", ns, *cmd[1:])
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        print(f"skipped: needs root and ip netns ({str(detail).strip()})")
        for ns in created:
            sh("ip", "netns", "del", ns, check=False)
        return
    try:
        print(iperf(ns_a, ns_b, addr_b), flush=True)
        master = subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable, "-m", "pccl.master",
                                   "--listen-address", f"{addr_a}:0"], stdout=subprocess.PIPE, env=peer_env(), text=True)
        if not select.select([master.stdout], [], [], 30)[0]:
            raise TimeoutError("the master did not report its address")
        line = master.stdout.readline().strip()
        if not line.startswith("pccl master listening on"):
            raise RuntimeError(f"unexpected master output {line!r}")
        variants = ["none", "u8 min-max"]
        task = {"task": "timing", "bytes": 64 * MIB, "variants": variants, "rounds": args.rounds,
                "reps": args.shaped_reps, "addr": line.rsplit(" ", 1)[1], "world": 2}
        prefixes = [["ip", "netns", "exec", ns, "env", f"PYTHONPATH={peer_env().get('PYTHONPATH', '')}"]
                    for ns in (ns_a, ns_b)]
        results = run_peers([dict(task, rank=r) for r in range(2)], prefixes, args.timeout)
        table(TIMING_COLS, timing_rows(results, 2, 64 * MIB, variants))
        speedup = median_time(results, "none") / median_time(results, "u8 min-max")
        print(f"uint8 min-max speedup on the shaped link: {speedup:.2f}x (PCCL 1.0: 0.90 -> 2.0 Gbit/s logical, "
              f"2.2x; target >= 3.5x)")
    finally:
        if master is not None:
            master.kill()  # it holds no state worth a clean stop
            master.wait(timeout=5)
        for ns in created:  # deleting a namespace deletes its veth end, and with it the pair
            sh("ip", "netns", "del", ns, check=False)


def section_error(args) -> None:
    variants = ["none", "u8 min-max", "u8 zero-point"]
    print("\n== error: relative L2 error ||y - exact|| / ||exact|| vs float64, N(0,1) float32, 1<<20 elements "
          "per peer (max over peers) ==")
    rows = []
    for world in range(2, 9):
        res = loopback_peers(world, {"task": "error", "variants": variants}, args.timeout)
        rows.append([str(world)] + [f"{max(r[f'{v}|{op}'] for r in res):.2e}" for v in variants for op in ("SUM", "AVG")])
    table(["N"] + [f"{v} {op}" for v in variants for op in ("SUM", "AVG")], rows)
    print("(PCCL 1.0: 3.8e-2 for uint8 min-max SUM at N = 2; target <= 1.3e-2)")


def section_concurrency(args) -> None:
    print(f"\n== many small ops vs one large op: loopback, N = 2, float32 SUM, {args.rounds} rounds, alternated ==")
    results = loopback_peers(2, {"task": "concurrency", "rounds": args.rounds}, args.timeout)
    rows = []
    for v, ops in (("1024 x 16 KiB, sequential", 1024), ("1024 x 16 KiB, 16 in flight", 1024), ("1 x 16 MiB", 1)):
        t = median_time(results, v)
        rows.append([v, f"{t * 1e3:.1f}", f"{ops / t:.0f}", f"{busbw(2, 16 * MIB, t):.2f}"])
    table(["variant", "total ms", "ops/s", "bus Gbit/s"], rows)


SECTIONS = {"loopback": section_loopback, "shaped": section_shaped, "error": section_error,
            "concurrency": section_concurrency}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--rounds", type=int, default=5, help="rounds of alternating variants (median)")
    ap.add_argument("--reps", type=int, default=2, help="loopback ops per variant per round")
    ap.add_argument("--shaped-reps", type=int, default=1, help="shaped-link ops per variant per round")
    ap.add_argument("--tbf-burst", default="128kb", help="tbf burst on each veth end")
    ap.add_argument("--tbf-latency", default="50ms", help="tbf latency on each veth end")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per group of peers")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return peer_main(json.loads(args.peer)) or 0

    def on_signal(signum, frame):
        raise KeyboardInterrupt  # unwinds through every `finally`: children killed, namespaces deleted

    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background job starts with it ignored
        signal.signal(sig, on_signal)
    print(f"{os.uname().nodename}: nproc={os.cpu_count()}, python {sys.version.split()[0]}, peers pinned to 1 BLAS thread")
    failed = False
    for name in args.sections:
        t0 = time.monotonic()
        try:
            SECTIONS[name](args)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next section
            print(f"{name} failed: {exc}")
            failed = True
        print(f"({name} took {time.monotonic() - t0:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
