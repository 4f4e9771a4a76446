"""Shared-state sync benchmark: 1 GiB to a late joiner on loopback, and the hash's throughput.

Per run: a master, D up-to-date peers (the distributors) and one peer whose state is all zeros.
All sync once; the figure is the stale peer's wall time for sync_shared_state (hashing included)
and the rate 1 GiB / time. Then all sync again, already equal: that call's time is what every
training step's check costs (hashing, votes, nothing moves). The hash (pccl/_hashing.py) is timed
alone on one core over the same 1 GiB, and on the GPU where there is one.

    PYTHONPATH=. python benchmarks/shared_state.py [--gib 1] [--distributors 1 2] [--tensors 8]
        [--device cpu|cuda]   (cuda: the peers' state is CUDA tensors, hashed on the GPU)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

ENTRY_DTYPE = "float32"


def peer(port: int, world: int, stale: bool, total_bytes: int, tensors: int, device: str, q) -> None:
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import numpy as np
    import pccl
    per = total_bytes // tensors // 4
    # The stale peer's memory is touched (as a constructed model's is): on this VM, first-touch page
    # faults alone cost about 2 s per GiB, which would drown what is being measured.
    arrays = [np.full(per, -1, np.float32) if stale else np.full(per, i + 1, np.float32) for i in range(tensors)]
    if device == "cpu":
        infos = [pccl.TensorInfo.from_numpy(a, f"layer{i}") for i, a in enumerate(arrays)]
    else:
        import torch
        arrays = [torch.from_numpy(a).to(device) for a in arrays]
        infos = [pccl.TensorInfo.from_torch(a, f"layer{i}") for i, a in enumerate(arrays)]
    state = pccl.SharedState(infos)
    state.revision = 0 if stale else 7
    comm = pccl.Communicator(f"127.0.0.1:{port}")
    comm.connect(n_attempts=20)
    while comm.get_attribute(pccl.Attribute.LOCAL_WORLD_SIZE) < world:
        if comm.are_peers_pending():
            comm.update_topology()
        else:
            time.sleep(0.01)
    t0 = time.perf_counter()
    info = comm.sync_shared_state(state)
    seconds = time.perf_counter() - t0
    ok = all(bool((a == i + 1).all()) for i, a in enumerate(arrays)) and state.revision == 7
    state.push_revision()
    t0 = time.perf_counter()
    again = comm.sync_shared_state(state)
    in_sync_seconds = time.perf_counter() - t0
    ok = ok and again.rx_bytes == 0 and again.tx_bytes == 0
    q.put((stale, seconds, info.rx_bytes, info.tx_bytes, ok, in_sync_seconds))
    time.sleep(0.5)
    comm.close()


def run(distributors: int, total_bytes: int, tensors: int, device: str) -> dict:
    import pccl
    master = pccl.MasterNode("127.0.0.1:0")
    master.run()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    world = distributors + 1
    procs = [ctx.Process(target=peer, args=(master.port, world, i == distributors, total_bytes, tensors, device, q))
             for i in range(world)]
    try:
        for p in procs:
            p.start()
        results = [q.get(timeout=300) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        master.interrupt()
    stale = next(r for r in results if r[0])
    return {"seconds": stale[1], "rx": stale[2], "ok": all(r[4] for r in results),
            "tx_per_distributor": [r[3] for r in results if not r[0]], "in_sync": max(r[5] for r in results)}


def hash_rate(total_bytes: int, device: str) -> float:
    import numpy as np
    from pccl._hashing import digest_host, digest_tensors
    data = np.random.default_rng(0).integers(0, 256, total_bytes, dtype=np.uint8)
    if device == "cpu":
        digest = lambda: digest_host(data)  # noqa: E731
    else:
        import torch
        on_device = torch.from_numpy(data).to(device)
        digest = lambda: digest_tensors([on_device])  # noqa: E731  (returns once the digest is on the host)
    digest()  # warm-up (allocator, kernels)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        digest()
        times.append(time.perf_counter() - t0)
    return total_bytes / statistics.median(times) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="state size in GiB")
    ap.add_argument("--distributors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tensors", type=int, default=8, help="entries the state is split into")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the peers' tensors live: cpu, or cuda")
    args = ap.parse_args()
    total = int(args.gib * (1 << 30))
    print(f"hash (XXH3-128 over 256 KiB chunks) on one core: {hash_rate(total, 'cpu'):.1f} GB/s")
    if args.device != "cpu":
        print(f"hash on {args.device}: {hash_rate(total, args.device):.1f} GB/s")
    print(f"sync of {args.gib:g} GiB ({args.tensors} float32 entries on {args.device}) to a stale peer; "
          f"PCCL 1.0: 2.4 s (0.44 GB/s)")
    for d in args.distributors:
        runs = [run(d, total, args.tensors, args.device) for _ in range(args.rounds)]
        secs = statistics.median(r["seconds"] for r in runs)
        in_sync = statistics.median(r["in_sync"] for r in runs)
        ok = all(r["ok"] for r in runs)
        print(f"  {d} distributor(s): {secs:.3f} s median of {args.rounds} ({total / secs / 1e9:.2f} GB/s), "
              f"received {runs[0]['rx'] / 1e9:.3f} GB, sent per distributor "
              f"{[round(t / 1e9, 3) for t in runs[0]['tx_per_distributor']]} GB, bit-identical: {ok}; "
              f"the next sync, all equal: {in_sync * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
