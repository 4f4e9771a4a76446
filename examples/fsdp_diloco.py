"""DiLoCo across FSDP replicas: torch FSDP2 (``fully_shard``, gloo, CPU) shards the model inside each
replica, pccl averages the replicas' pseudo-gradients.

2 replicas of 2 ranks each, 4 processes. Each replica is a torch.distributed world of its own (its
own TCP rendezvous port), and ``fully_shard`` splits every parameter over its 2 ranks (DTensors; each
rank holds one shard). Rank r of every replica joins pccl peer group r
(``Communicator(..., peer_group=r)``), so each shard is all-reduced only with the same shard of the
other replicas, and DiLoCo gets the replica's process group as ``replica_group`` so that the ranks of
a replica agree on when to wait for peers (one rank training alone would deadlock FSDP's collectives).

The model, a small MLP, learns to imitate a fixed random "teacher" MLP whose output is scaled to unit
variance (so the loss is the fraction of the target's variance not yet explained); each rank of each
replica draws its own inputs. It prints the mean loss of every outer step and checks:
- writing into ``p.to_local()`` (how DiLoCo resets a model to the outer parameters) changes the
  sharded parameters FSDP computes with: after zeroing every shard, the forward pass returns zeros;
- parity: after training, the state digest of rank r is the same in every replica.

Run it (the master and both replicas on this machine):

    python examples/fsdp_diloco.py [--inner-steps 10] [--outer-steps 20]

On real machines: start a master on one of them, then one replica per machine (R = 0 .. N-1); each
starts its 2 ranks with a rendezvous on its own loopback:

    python -m pccl.master --listen-address 0.0.0.0:48148                      # on 10.0.0.1
    python examples/fsdp_diloco.py --master 10.0.0.1:48148 --replicas N --replica R

(the parity check then compares only this machine's replica; the digests each machine prints for
rank r must be equal.)
"""

from __future__ import annotations

import argparse
import socket
from collections import defaultdict
from datetime import timedelta

from tqdm import tqdm

from launch import Launcher, run_main, wait_for_peers

RANKS_PER_REPLICA = 2
INPUTS = 32
HIDDEN = 129                # odd on purpose: uneven shards (rank 1 holds none of the last layer)
BATCH = 32
INNER_LR = 3e-3
# A rank may wait up to launch.WAIT_FOR_PEERS_S for the other replicas while its sibling already
# waits for it in a gloo collective: give gloo longer than that.
GLOO_TIMEOUT_S = 300.0


def make_mlp(seed: int):
    import torch
    from torch import nn
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                         nn.Linear(HIDDEN, 1))


def shard_model(model, mesh) -> None:
    """FSDP2: every Linear is a unit of its own, the root takes what is left."""
    import torch
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def writes_to_local_reach_fsdp(model) -> bool:
    """Zero every parameter through ``p.to_local()``: the forward pass must then return zeros. The
    shards are restored afterwards. (Collective: every rank of the replica calls it.)"""
    import torch
    saved = [p.to_local().detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().zero_()
        output = model(torch.ones(4, INPUTS))
        for p, shard in zip(model.parameters(), saved):
            p.to_local().copy_(shard)
    return bool((output == 0).all())




def rank_main(events, master: str, replicas: int, replica: int, rank: int, rendezvous_port: int,
              inner_steps: int, outer_steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import pccl
    from pccl.diloco import DiLoCo

    torch.set_num_threads(1)  # 4 processes share this machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{rendezvous_port}", rank=rank,
                            world_size=RANKS_PER_REPLICA, timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    model = make_mlp(seed=0)  # the same initialisation in every replica (the first sync checks it)
    shard_model(model, init_device_mesh("cpu", (RANKS_PER_REPLICA,)))
    to_local_ok = writes_to_local_reach_fsdp(model)
    teacher = make_mlp(seed=1)
    with torch.no_grad():
        teacher[-1].weight /= teacher(torch.randn(4096, INPUTS, generator=torch.Generator().manual_seed(1))).std()
        teacher[-1].bias.zero_()
    inner = torch.optim.AdamW(model.parameters(), lr=INNER_LR)

    comm = pccl.Communicator(master, peer_group=rank, p2p_connection_pool_size=1)
    comm.connect(n_attempts=20)
    wait_for_peers(comm, replicas)
    diloco = DiLoCo(model, inner, comm, inner_steps=inner_steps, replica_group=dist.group.WORLD)
    diloco.join()
    inputs = torch.Generator().manual_seed(100 + RANKS_PER_REPLICA * replica + rank)
    losses = []
    while diloco.outer_step < outer_steps:
        x = torch.randn(BATCH, INPUTS, generator=inputs)
        with torch.no_grad():
            target = teacher(x)
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        inner.step()
        inner.zero_grad()
        losses.append(loss.item())
        report = diloco.step()
        if report is not None:
            events.put({"kind": "outer", "replica": replica, "rank": rank, "outer_step": report.outer_step,
                        "loss": sum(losses) / len(losses), "applied": report.applied,
                        "tx_bytes": report.reduce_tx_bytes})
            losses = []
    events.put({"kind": "result", "replica": replica, "rank": rank, "to_local_ok": to_local_ok,
                "digest": diloco.state_digest(),
                "shard_elements": sum(p.to_local().numel() for p in model.parameters())})
    comm.close()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2, help="replicas in the run (default %(default)s)")
    parser.add_argument("--inner-steps", type=int, help="H, inner steps per outer step (default 10; --smoke: 5)")
    parser.add_argument("--outer-steps", type=int, help="outer steps (default 20; --smoke: 3)")
    parser.add_argument("--master", help="HOST:PORT of a running master; default: start one here")
    parser.add_argument("--replica", type=int, help="with --master: run only replica REPLICA (its 2 ranks) here")
    parser.add_argument("--smoke", action="store_true", help="3 short outer steps: a quick check")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="give up after this long")
    args = parser.parse_args()
    inner_steps = args.inner_steps or (5 if args.smoke else 10)
    outer_steps = args.outer_steps or (3 if args.smoke else 20)
    replicas = [args.replica] if args.replica is not None else list(range(args.replicas))
    processes = len(replicas) * RANKS_PER_REPLICA

    by_step: dict[int, list[dict]] = defaultdict(list)
    results: list[dict] = []
    with Launcher(args.master, args.timeout_s) as run:
        print(f"master {run.master}; replica(s) {replicas} of {args.replicas}, {RANKS_PER_REPLICA} FSDP ranks each; "
              f"{outer_steps} outer steps of H={inner_steps}")
        for replica in replicas:
            port = free_port()  # this replica's own torch.distributed rendezvous
            for rank in range(RANKS_PER_REPLICA):
                run.start(f"replica {replica} rank {rank}", rank_main, run.master, args.replicas, replica, rank,
                          port, inner_steps, outer_steps)
        with tqdm(total=outer_steps, desc="outer steps", unit="step") as bar:
            for event in run.follow():
                if event["kind"] == "result":
                    results.append(event)
                    continue
                reports = by_step[event["outer_step"]]
                reports.append(event)
                if len(reports) == processes:
                    loss = sum(r["loss"] for r in reports) / processes
                    sent = sum(r["tx_bytes"] for r in reports)
                    bar.write(f"outer step {event['outer_step']:3d}: loss {loss:.4f} (mean over {processes} ranks), "
                              f"applied: {'yes' if all(r['applied'] for r in reports) else 'NO'}, "
                              f"{sent:,} bytes sent")
                    bar.update()
    if len(results) != processes:
        print(f"summary: only {len(results)} of {processes} ranks finished")
        return 1

    digests = {(r["replica"], r["rank"]): r["digest"] for r in results}
    to_local_ok = all(r["to_local_ok"] for r in results)
    print(f"check: writing into p.to_local() reaches FSDP's sharded parameters (zeroed shards -> zero output) "
          f"on every rank: {'passed' if to_local_ok else 'FAILED'}")
    parity = True
    for rank in range(RANKS_PER_REPLICA):
        mine = {digests[(replica, rank)] for replica in replicas}
        parity = parity and len(mine) == 1
        elements = next(r["shard_elements"] for r in results if r["rank"] == rank)
        print(f"check: rank {rank} ({elements:,} parameter elements in its shard) has the same state digest in "
              f"replica(s) {replicas} ({', '.join(d[:16] for d in sorted(mine))}): "
              f"{'passed' if len(mine) == 1 else 'FAILED'}")
    final = by_step[max(by_step)] if by_step else []
    loss = sum(r["loss"] for r in final) / len(final) if final else float("nan")
    print(f"summary: {max(by_step, default=0)} outer steps, last outer step's loss {loss:.4f}; parity "
          f"{'equal' if parity else 'DIFFERENT'}")
    return 0 if to_local_ok and parity else 1


if __name__ == "__main__":
    run_main(main)
