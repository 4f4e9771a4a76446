"""WAN bandwidth: how much of a long fat pipe a ring all-reduce fills, against the connection pool size.

Every peer all-reduces SIZE bytes of float32 for each point of a sweep: each pool size
(``p2p_connection_pool_size``), as one tensor and as many tensors in flight at once, unquantized and
quantized to uint8 on the wire. The bus bandwidth, 2(N-1)/N x bytes / time, is what each link of the
ring carried (logical bytes: a quantized op moves a quarter of them). Results are checked to be
bit-identical on every peer.

Across real hosts: a master on one host, then the same command on each of the N hosts:

    pccl-master --listen-address 0.0.0.0:48148                                   # on 203.0.113.5
    python examples/wan_bandwidth.py --master 203.0.113.5:48148 --world N

On this machine, across the WAN emulator (root; network namespaces and a user-space delay line,
see pccl.testing.wan), with gloo measured in the same setup:

    python examples/wan_bandwidth.py --emulate rtt=100ms,rate=1gbit,loss=0.01%,flow=100mbit --gloo

Prints a table and writes a PNG of bus bandwidth against pool size (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from launch import run_main, wait_for_peers

UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
QUANTIZATIONS = ("none", "uint8")
PARITY_TAG = 1 << 20          # above every data tensor's tag
PEER_START_TIMEOUT_S = 60.0   # emulated mode: how long the master may take to say its port
POINT_TIMEOUT_S = 600.0       # emulated mode: the slowest point (pool 1, gloo) moves 256 MiB at one flow's cap
SMOKE = dict(size="4MiB", pools=[1, 4], tensors=[1, 8], quant=["none", "uint8"], reps=1, warmup=0,
             emulate="rtt=4ms,rate=400mbit,flow=50mbit", world=3)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (bytes, or a KiB/MiB/GiB suffix)")
    return int(m.group(1)) * UNITS[m.group(2).upper()]


def bus_gbit(nbytes: int, world: int, seconds: float) -> float:
    return 2 * (world - 1) / world * nbytes * 8 / seconds / 1e9


# ------------------------------------------------------------------------------------ peer side

def time_point(comm: Any, data: list, quant: str, reps: int, warmup: int) -> tuple[list[float], str, bool]:
    """The times of `reps` all-reduces of every tensor of `data` at once, after `warmup` untimed ones; the
    results' digest, and whether every peer ended with that same digest (its minimum and maximum over
    the group agree)."""
    import numpy as np
    import xxhash

    import pccl
    options = None
    if quant != "none":
        options = pccl.QuantizationOptions(quantized_datatype=pccl.DataType.UINT8,
                                           algorithm=pccl.QuantizationAlgorithm.MIN_MAX)
    times = []
    # Destinations touched before the clock starts: first-touch page faults on 256 MiB cost this
    # VM about half a second, which is the kernel's, not the network's.
    outs = [np.empty_like(x) for x in data]
    for out in outs:
        out.fill(0)
    for rep in range(warmup + reps):
        start = time.perf_counter()
        handles = [comm.all_reduce_async(x, out, op=pccl.ReduceOp.SUM, tag=tag, quantization_options=options)
                   for tag, (x, out) in enumerate(zip(data, outs))]
        for h in handles:
            ok, status, _ = h.wait()
            if not ok:
                raise RuntimeError(f"all-reduce failed: {status}")
        if rep >= warmup:
            times.append(time.perf_counter() - start)
    h = xxhash.xxh3_64()
    for out in outs:
        h.update(out)
    digest = np.array([h.intdigest() >> 1], dtype=np.int64)  # 63 bits: int64 MIN/MAX are exact
    low, high = digest.copy(), digest.copy()
    comm.all_reduce(digest, low, op=pccl.ReduceOp.MIN, tag=PARITY_TAG)
    comm.all_reduce(digest, high, op=pccl.ReduceOp.MAX, tag=PARITY_TAG)
    return times, h.hexdigest(), bool(low[0] == high[0])


def run_peer(args: argparse.Namespace) -> list[dict]:
    """The sweep on one host: a fresh communicator per pool size, every point timed and reported."""
    import numpy as np

    import pccl
    count = args.size // 4
    rng = np.random.default_rng(os.getpid())
    values = rng.standard_normal(count, dtype=np.float32)
    results = []
    bar = tqdm(total=len(args.pools) * len(args.tensors) * len(args.quant), desc="sweep", unit="point",
               disable=args.quiet)
    for pool in args.pools:
        comm = pccl.Communicator(args.master, p2p_connection_pool_size=pool)
        comm.connect(n_attempts=50)
        wait_for_peers(comm, args.world)
        for tensors in args.tensors:
            data = [np.ascontiguousarray(x) for x in np.array_split(values, tensors)]
            for quant in args.quant:
                times, digest, agree = time_point(comm, data, quant, args.reps, args.warmup)
                if not agree:
                    raise RuntimeError(f"peers ended pool {pool} x{tensors} {quant} with different bits")
                point = {"kind": "point", "pool": pool, "tensors": tensors, "quant": quant, "seconds": min(times),
                         "median_seconds": statistics.median(times), "digest": digest, "world": args.world}
                results.append(point)
                if args.quiet:
                    print(json.dumps(point), flush=True)
                bar.update(1)
        comm.close()  # the parity all-reduces were the last ops: every peer is past them
    bar.close()
    return results


def run_gloo_peer(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://{args.store}", rank=args.rank, world_size=args.world,
                            timeout=__import__("datetime").timedelta(seconds=POINT_TIMEOUT_S))
    values = torch.from_numpy(np.random.default_rng(args.rank).standard_normal(args.size // 4, dtype=np.float32))
    for tensors in args.tensors:
        data = [x.clone() for x in torch.tensor_split(values, tensors)]
        dist.barrier()
        times = []
        for rep in range(args.warmup + args.reps):
            start = time.perf_counter()
            works = [dist.all_reduce(x, async_op=True) for x in data]
            for w in works:
                w.wait()
            if rep >= args.warmup:
                times.append(time.perf_counter() - start)
        print(json.dumps({"kind": "point", "pool": 0, "tensors": tensors, "quant": "gloo", "seconds": min(times),
                          "median_seconds": statistics.median(times), "digest": "", "world": args.world}), flush=True)
    dist.destroy_process_group()


# ------------------------------------------------------------------------- emulated launcher

class Procs:
    """Processes started in namespaces, killed on the way out whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})})
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def read_points(procs: list[subprocess.Popen], expected: int, bar: tqdm) -> list[list[dict]]:
    """Every peer's point lines; the bar advances with peer 0's."""
    import selectors
    sel = selectors.DefaultSelector()
    for i, p in enumerate(procs):
        sel.register(p.stdout, selectors.EVENT_READ, i)
    points: list[list[dict]] = [[] for _ in procs]
    deadline = time.monotonic() + POINT_TIMEOUT_S * max(expected, 1)
    while any(len(x) < expected for x in points):
        if time.monotonic() > deadline:
            raise TimeoutError("the sweep took too long")
        for key, _ in sel.select(timeout=1.0):
            line = key.fileobj.readline()
            i = key.data
            if not line:
                sel.unregister(key.fileobj)
                if len(points[i]) < expected:
                    procs[i].wait(timeout=10)
                    raise RuntimeError(f"peer {i} exited early:\n{procs[i].stderr.read()[-3000:]}")
                continue
            if line.startswith("{"):
                event = json.loads(line)
                points[i].append(event)
                if i == 0:
                    bar.update(1)
                    bar.set_postfix_str(f"pool {event['pool']} x{event['tensors']} {event['quant']}: "
                                        f"{event['seconds']:.2f} s")
    return points


def peer_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--quiet", "--size", str(args.size), "--reps", str(args.reps),
            "--warmup", str(args.warmup),
            "--world", str(args.world), "--pools", *map(str, args.pools), "--tensors", *map(str, args.tensors),
            "--quant", *args.quant, *extra]


def run_emulated(args: argparse.Namespace) -> list[dict]:
    from pccl.testing.wan import WanEmulator, emulator_available
    ok, why = emulator_available()
    if not ok:
        raise SystemExit(f"the WAN emulator cannot run here: {why}")
    total = len(args.pools) * len(args.tensors) * len(args.quant)
    results: list[dict] = []
    procs = Procs()
    with WanEmulator(args.world, args.emulate) as wan, tqdm(total=total + (len(args.tensors) if args.gloo else 0),
                                                           desc="sweep", unit="point") as bar:
        try:
            master = procs.start(wan.exec_prefix(0) + [sys.executable, "-m", "pccl.master", "--listen-address",
                                                       f"{wan.host_ip(0)}:0"])
            port = read_master_port(master)
            address = f"{wan.host_ip(0)}:{port}"
            peers = [procs.start(wan.exec_prefix(i) + peer_argv(args, ["--master", address]))
                     for i in range(args.world)]
            points = read_points(peers, total, bar)
            results += check_parity(points)
            if args.gloo:
                store = f"{wan.host_ip(0)}:{port + 1 if port < 65535 else port - 1}"
                gloo = [procs.start(wan.exec_prefix(i) + peer_argv(args, ["--gloo-peer", "--rank", str(i),
                                                                          "--store", store]),
                                    env={"GLOO_SOCKET_IFNAME": "wan0"})
                        for i in range(args.world)]
                results += [p for p in read_points(gloo, len(args.tensors), bar)[0]]
        finally:
            procs.close()
    return results


def read_master_port(master: subprocess.Popen) -> int:
    deadline = time.monotonic() + PEER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = master.stdout.readline()
        if not line:
            break
        m = re.search(r":(\d+)\s*$", line.strip())
        if "listening" in line and m:
            return int(m.group(1))
    raise RuntimeError(f"the master did not start: {master.stderr.read()[-2000:] if master.poll() is not None else ''}")


def check_parity(points: list[list[dict]]) -> list[dict]:
    """Peer 0's points, after checking that every peer ended every point with the same bits."""
    for per_point in zip(*points):
        digests = {p["digest"] for p in per_point}
        if len(digests) != 1:
            raise RuntimeError(f"peers disagree on the result of {per_point[0]}: {digests}")
        per_point[0]["slowest_seconds"] = max(p["seconds"] for p in per_point)
        per_point[0]["slowest_median_seconds"] = max(p["median_seconds"] for p in per_point)
    return points[0]


# ----------------------------------------------------------------------------------- reporting

def link_rate_gbit(spec: str | None) -> float | None:
    if not spec:
        return None
    from pccl.testing.link_spec import LinkSpec
    rate = LinkSpec.parse(spec).rate
    return rate / 1e9 if rate else None


def report(results: list[dict], args: argparse.Namespace) -> None:
    link = link_rate_gbit(args.emulate)
    # Both modes raise before this point when peers disagree (parity all-reduces, digests).
    print("check: every peer ended every point with the same bits: passed")
    print(f"\n{args.size / 2**20:.0f} MiB float32 SUM, {args.world} peers"
          + (f", emulated link {args.emulate}" if args.emulate else "") + f", best and median of {args.reps} after {args.warmup} untimed")
    print(f"{'library':8} {'pool':>4} {'tensors':>7} {'wire':>6} {'time s':>8} {'bus Gbit/s':>10}"
          + (f" {'of link':>8}" if link else "") + f" {'median s':>9}" + (f" {'of link':>8}" if link else ""))
    for r in results:
        seconds = r.get("slowest_seconds", r["seconds"])
        gbit = bus_gbit(args.size, args.world, seconds)
        r["bus_gbit"] = gbit
        lib = "gloo" if r["quant"] == "gloo" else "pccl"
        wire = "fp32" if r["quant"] in ("none", "gloo") else r["quant"]
        pool = "-" if lib == "gloo" else str(r["pool"])
        median = r.get("slowest_median_seconds", r["median_seconds"])
        median_gbit = bus_gbit(args.size, args.world, median)
        print(f"{lib:8} {pool:>4} {r['tensors']:>7} {wire:>6} {seconds:>8.2f} {gbit:>10.3f}"
              + (f" {gbit / link:>7.0%}" if link else "") + f" {median:>9.2f}"
              + (f" {median_gbit / link:>7.0%}" if link else ""))
    if args.plot:
        plot(results, args, link)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def plot(results: list[dict], args: argparse.Namespace, link: float | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tensors in args.tensors:
        for quant in args.quant:
            pts = sorted((r["pool"], r["bus_gbit"]) for r in results
                         if r["tensors"] == tensors and r["quant"] == quant)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"pccl, {tensors} tensor{'s' * (tensors > 1)}, {quant}")
    gloo_styles = iter(["--", "-.", ":"] * len(args.tensors))
    for r in results:
        if r["quant"] == "gloo":
            ax.axhline(r["bus_gbit"], linestyle=next(gloo_styles), color="grey", linewidth=1,
                       label=f"gloo, {r['tensors']} tensor{'s' * (r['tensors'] > 1)}")
    if link:
        ax.axhline(link, linestyle=":", color="black", linewidth=1, label="link rate")
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.pools, [str(p) for p in args.pools])
    ax.set_xlabel("p2p_connection_pool_size")
    ax.set_ylabel("bus bandwidth (Gbit/s, logical bytes)")
    ax.set_title(f"{args.size / 2**20:.0f} MiB all-reduce, {args.world} peers"
                 + (f"\n{args.emulate}" if args.emulate else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--master", help="HOST:PORT of a running master: this process is one peer of the sweep")
    where.add_argument("--emulate", metavar="SPEC",
                       help="run every peer here across the WAN emulator, e.g. rtt=100ms,rate=1gbit,loss=0.01%%,flow=100mbit")
    ap.add_argument("--world", type=int, default=3, help="number of peers (default 3)")
    ap.add_argument("--size", type=parse_size, default=parse_size("256MiB"), help="bytes per all-reduce (default 256MiB)")
    ap.add_argument("--pools", type=int, nargs="+", default=[1, 4, 16, 32], help="pool sizes to sweep")
    ap.add_argument("--tensors", type=int, nargs="+", default=[1, 64], help="split the bytes into this many tensors in flight")
    ap.add_argument("--quant", nargs="+", choices=QUANTIZATIONS, default=list(QUANTIZATIONS), help="wire formats")
    ap.add_argument("--reps", type=int, default=1, help="timed repetitions per point (best is kept)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed repetitions before them (fresh connections start in TCP slow start)")
    ap.add_argument("--gloo", action="store_true", help="with --emulate: also time torch.distributed gloo")
    ap.add_argument("--plot", default="wan_bandwidth.png", help="PNG to write ('' for none)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--smoke", action="store_true", help="a quick emulated run with small figures (for the tests)")
    ap.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # a peer of --emulate: JSON lines
    ap.add_argument("--gloo-peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, parse_size(value) if key == "size" else value)
    if args.world < 2 or args.size % 4 or args.size < 4 * max(args.tensors):
        ap.error("--world must be >= 2 and --size a multiple of 4 bytes with at least one float per tensor")
    if args.gloo_peer:
        run_gloo_peer(args)
        return 0
    if args.master and not args.emulate:
        results = run_peer(args)
        if not args.quiet:
            report(results, args)
        return 0
    if not args.emulate:
        ap.error("give --master HOST:PORT (one command per host) or --emulate SPEC (everything here)")
    report(run_emulated(args), args)
    return 0


if __name__ == "__main__":
    run_main(main)
