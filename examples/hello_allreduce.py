"""Hello, all-reduce: a master and 3 peers all-reduce a tensor a few times, on this machine.

Peer i contributes the number i + 1 in every element, so a SUM over 3 peers gives 6 and an AVG gives
2 on every peer. Each peer's loop shows the three things every pccl program does:
- the membership pump: ``are_peers_pending()`` then ``update_topology()`` admits peers that connected
  meanwhile (a collective: every member calls it and gets the same answer);
- waiting while the group is too small (``Attribute.LOCAL_WORLD_SIZE``);
- retrying an all-reduce that failed because a peer went away (PCCLError: the buffer is restored as
  it was, so the retry on the surviving ring is exact).
A peer's pccl calls are all in ``peer`` below; the master and the processes are started and
stopped by launch.py, which all the examples share.

Run it (the master and the peers on this machine):

    python examples/hello_allreduce.py [--peers 3] [--rounds 6]

On real machines: start a master on one of them, then one peer per machine (I = 0 .. N-1):

    python -m pccl.master --listen-address 0.0.0.0:48148                         # on 10.0.0.1
    python examples/hello_allreduce.py --master 10.0.0.1:48148 --peers N --index I
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from launch import Launcher, run_main

ELEMENTS = 1 << 20          # 4 MiB of float32 per all-reduce
WAIT_FOR_GROUP_S = 120.0    # how long a peer waits for the whole group to be in
POLL_S = 0.05


def peer(events, master: str, index: int, peers: int, rounds: int) -> None:
    import numpy as np

    import pccl
    from pccl import Attribute, PCCLError, ReduceOp, Result

    retryable = {Result.RANK_CONNECTION_LOST, Result.RANK_CONNECTION_FAILED, Result.TOO_FEW_PEERS}
    comm = pccl.Communicator(master, peer_group=0, p2p_connection_pool_size=1)
    comm.connect(n_attempts=20)
    x = np.empty(ELEMENTS, dtype=np.float32)
    # The first round waits for the whole group, so every round sums the same contributions; later
    # rounds carry on with whoever is left, as long as that is at least two peers.
    needed, deadline, done = peers, time.monotonic() + WAIT_FOR_GROUP_S, 0
    while done < rounds:
        if comm.are_peers_pending():
            comm.update_topology()
        if comm.get_attribute(Attribute.LOCAL_WORLD_SIZE) < needed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {needed} peers after {WAIT_FOR_GROUP_S:.0f} s")
            time.sleep(POLL_S)
            continue
        needed = 2
        op = ReduceOp.SUM if done % 2 == 0 else ReduceOp.AVG
        x.fill(index + 1)
        try:
            info = comm.all_reduce(x, x, op=op, tag=0)  # in place
        except PCCLError as e:
            if e.result not in retryable:
                raise
            events.put({"kind": "retry", "index": index, "round": done, "reason": e.result.name})
            deadline = time.monotonic() + WAIT_FOR_GROUP_S
            continue
        events.put({"kind": "result", "index": index, "round": done, "op": op.name,
                    "world": info.local_world_size, "value": float(x[0]), "uniform": bool((x == x[0]).all()),
                    "tx_bytes": info.tx_bytes})
        done += 1
    comm.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=3, help="peers in the group (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=6, help="all-reduces per peer (default %(default)s)")
    parser.add_argument("--master", help="HOST:PORT of a running master; default: start one here")
    parser.add_argument("--index", type=int, help="with --master: run only peer INDEX in this process tree")
    parser.add_argument("--smoke", action="store_true", help="2 rounds: a quick check that it works")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="give up after this long")
    args = parser.parse_args()
    rounds = 2 if args.smoke else args.rounds
    indices = [args.index] if args.index is not None else list(range(args.peers))
    expected = {"SUM": args.peers * (args.peers + 1) / 2, "AVG": (args.peers + 1) / 2}

    results = []
    with Launcher(args.master, args.timeout_s) as run:
        print(f"master {run.master}; starting peer(s) {indices} of a group of {args.peers}")
        for i in indices:
            run.start(f"peer {i}", peer, run.master, i, args.peers, rounds)
        with tqdm(total=len(indices) * rounds, desc="all-reduces", unit="op") as bar:
            for event in run.follow():
                if event["kind"] == "retry":
                    bar.write(f"peer {event['index']}: round {event['round']} failed ({event['reason']}); retrying")
                    continue
                results.append(event)
                bar.write(f"peer {event['index']}: round {event['round']} {event['op']:3s} over {event['world']} "
                          f"peers = {event['value']:g} in every element: {'yes' if event['uniform'] else 'NO'}, "
                          f"sent {event['tx_bytes'] / 2**20:.1f} MiB")
                bar.update()

    correct = all(r["uniform"] and r["value"] == expected[r["op"]] for r in results)
    print(f"summary: {len(results)} all-reduces by {len(indices)} peer(s); every SUM gave {expected['SUM']:g} "
          f"and every AVG {expected['AVG']:g}: {'yes' if correct else 'NO'}")
    return 0 if correct and len(results) == len(indices) * rounds else 1


if __name__ == "__main__":
    run_main(main)
