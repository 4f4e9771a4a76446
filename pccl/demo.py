"""`python -m pccl.demo`: a master and 3 peers on loopback all-reduce in a loop; one peer is killed
mid-run and the survivors carry on without a restart.

Each peer contributes its number (1, 2, 3) to every element, so the sum shows who took part: 6 while
all three run, 3 or 4 or 5 once one is gone. Every line is printed by a peer process.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import time

import numpy as np

DEMO_TENSOR_ELEMENTS = 4 << 20  # 16 MiB of float32 per all-reduce: long enough to be killed mid-flight


def peer(address: str, number: int, steps: int, out: mp.Queue) -> None:
    import pccl
    from pccl import Attribute, PCCLError, Result

    comm = pccl.Communicator(address, p2p_connection_pool_size=2)
    comm.connect(n_attempts=20)
    step = 0
    while step < steps:
        if comm.are_peers_pending():
            comm.update_topology()
        world = comm.get_attribute(Attribute.LOCAL_WORLD_SIZE)
        if world < 2:
            time.sleep(0.05)
            continue
        x = np.full(DEMO_TENSOR_ELEMENTS, float(number), dtype=np.float32)
        t0 = time.perf_counter()
        try:
            info = comm.all_reduce(x, x)
        except PCCLError as e:
            if e.result == Result.TOO_FEW_PEERS:
                continue
            out.put(("fail", number, step, str(e)))
            continue  # retry on the shrunken ring
        ms = 1000 * (time.perf_counter() - t0)
        out.put(("ok", number, step, info.local_world_size, float(x[0]), bool(np.all(x == x[0])), ms))
        step += 1
    comm.close()
    out.put(("done", number))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pccl.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="all-reduces per surviving peer")
    parser.add_argument("--kill-at", type=int, default=15, help="kill peer 3 after this many steps")
    args = parser.parse_args(argv)

    import pccl

    master = pccl.MasterNode("127.0.0.1:0")
    master.run()
    address = f"127.0.0.1:{master.port}"
    print(f"master listening on {address}; starting 3 peers")
    ctx = mp.get_context("spawn")
    events: mp.Queue = ctx.Queue()
    procs = {n: ctx.Process(target=peer, args=(address, n, args.steps, events), daemon=True) for n in (1, 2, 3)}
    for p in procs.values():
        p.start()
    killed = False
    done: set[int] = set()
    worlds: dict[int, set[int]] = {}
    deadline = time.monotonic() + 120
    try:
        while len(done) < 2 and time.monotonic() < deadline:
            try:
                event = events.get(timeout=1.0)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            kind, number = event[0], event[1]
            if kind == "ok":
                _, _, step, world, value, uniform, ms = event
                worlds.setdefault(number, set()).add(world)
                print(f"peer {number}: step {step:3d}  world {world}  sum {value:4.0f}  "
                      f"{'identical' if uniform else 'MISMATCH'}  {ms:6.2f} ms")
                if number == 3 and step + 1 >= args.kill_at and not killed:
                    time.sleep(0.01)  # into the next all-reduce
                    print("--- killing peer 3 (SIGKILL) in the middle of the run ---")
                    os.kill(procs[3].pid, signal.SIGKILL)
                    killed = True
            elif kind == "fail":
                print(f"peer {number}: step {event[2]:3d}  all-reduce failed ({event[3]}); retrying")
            elif kind == "done":
                done.add(number)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(5)
        master.interrupt()
    ok = done == {1, 2} and all(2 in worlds.get(n, set()) for n in (1, 2))
    print("survivors finished on the shrunken ring: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
