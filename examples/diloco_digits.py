"""DiLoCo against data-parallel training: an MLP on scikit-learn's bundled digits data set.

4 peers, each with its own shard of the training split, train the same MLP from the same
initialisation twice, with the same inner optimizer (AdamW, cosine learning-rate decay) and the same
number of inner steps:
(a) DiLoCo (pccl.diloco.DiLoCo): each peer trains alone for H inner steps, then the peers all-reduce
    their pseudo-gradients once and take one outer step (DiLoCo's default: Nesterov SGD, lr 0.7,
    momentum 0.9);
(b) data-parallel: the peers all-reduce (AVG) their gradients after every step.
At the end it prints both runs' loss and accuracy on the held-out test split and the bytes each run
sent (the sum of ReduceInfo.tx_bytes; for DiLoCo plus what its shared-state syncs sent, nothing
while the peers agree), and checks that DiLoCo's test loss is at most 5% above the data-parallel one
and that it sends H times fewer bytes (less 1%: each outer step also all-reduces a contributor
count, a frame of its own).

Run it (the master and the peers on this machine):

    python examples/diloco_digits.py [--peers 4] [--inner-steps 50] [--outer-steps 40]

On real machines: start a master on one of them, then one peer per machine (I = 0 .. N-1); every
peer waits until all N are in, then trains:

    python -m pccl.master --listen-address 0.0.0.0:48148                          # on 10.0.0.1
    python examples/diloco_digits.py --master 10.0.0.1:48148 --peers N --index I

(each machine then checks what it can alone; the DiLoCo state digests they print must be equal.)
"""

from __future__ import annotations

import argparse
import math
import time

from tqdm import tqdm

from launch import Launcher, run_main, wait_for_peers

HIDDEN = 64
BATCH = 64
INNER_LR = 3e-3
WEIGHT_DECAY = 0.1
FINAL_LR_FRACTION = 0.1     # the cosine decay ends at this fraction of INNER_LR
# Label smoothing keeps this small model from the few overconfident mistakes that otherwise dominate
# the held-out loss and make it jump by 10-20% with the order of the mini-batches.
LABEL_SMOOTHING = 0.1
TEST_FRACTION = 0.3
LOSS_TOLERANCE = 0.05       # DiLoCo's test loss may be at most this much above data-parallel's
BYTES_TOLERANCE = 0.01      # DiLoCo must send H times fewer bytes, less this fraction (its contributor counts)
PROGRESS_EVERY = 50         # inner steps between progress events


def load_split(index: int, peers: int):
    """(this peer's shard of the training split, the whole test split), as torch tensors."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        (digits.data / 16.0).astype("float32"), digits.target, test_size=TEST_FRACTION, random_state=0,
        stratify=digits.target)
    shard = slice(index, None, peers)
    return ((torch.from_numpy(x_train[shard]), torch.from_numpy(y_train[shard])),
            (torch.from_numpy(x_test), torch.from_numpy(y_test)))


def batches(shard, seed: int):
    """Endless shuffled mini-batches of a shard; the same sequence for the same seed."""
    import torch
    x, y = shard
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=generator)
        for begin in range(0, len(order) - BATCH + 1, BATCH):
            chosen = order[begin:begin + BATCH]
            yield x[chosen], y[chosen]


def make_model_and_optimizer(total_steps: int):
    """The MLP (same initialisation on every peer and in both runs), AdamW and its cosine schedule."""
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=INNER_LR, weight_decay=WEIGHT_DECAY)

    def cosine(step: int) -> float:
        progress = min(step, total_steps) / total_steps
        return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def evaluate(model, test) -> tuple[float, float]:
    import torch
    x, y = test
    with torch.no_grad():
        logits = model(x)
        return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())




def train_diloco(events, comm, index: int, shard, test, inner_steps: int, outer_steps: int) -> dict:
    import torch
    from pccl.diloco import DiLoCo

    model, inner, schedule = make_model_and_optimizer(inner_steps * outer_steps)
    diloco = DiLoCo(model, inner, comm, inner_steps=inner_steps)  # outer: Nesterov SGD, lr 0.7, momentum 0.9
    started = time.perf_counter()
    tx_bytes = diloco.join()[0]
    stream = batches(shard, seed=index)
    while diloco.outer_step < outer_steps:
        x, y = next(stream)
        torch.nn.functional.cross_entropy(model(x), y, label_smoothing=LABEL_SMOOTHING).backward()
        inner.step()
        schedule.step()
        inner.zero_grad()
        report = diloco.step()
        if report is not None:
            tx_bytes += report.reduce_tx_bytes + report.sync_tx_bytes
            events.put({"kind": "progress", "index": index, "inner_steps": inner_steps})
    seconds = time.perf_counter() - started
    loss, accuracy = evaluate(model, test)
    return {"loss": loss, "accuracy": accuracy, "tx_bytes": tx_bytes, "seconds": seconds,
            "digest": diloco.state_digest()}


def train_data_parallel(events, comm, index: int, shard, test, total_steps: int) -> dict:
    import torch
    from pccl import PCCLError, ReduceOp, Result

    model, optimizer, schedule = make_model_and_optimizer(total_steps)
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params))
    tx_bytes, stream, started = 0, batches(shard, seed=index), time.perf_counter()
    for step in range(1, total_steps + 1):
        x, y = next(stream)
        torch.nn.functional.cross_entropy(model(x), y, label_smoothing=LABEL_SMOOTHING).backward()
        torch.cat([p.grad.reshape(-1) for p in params], out=flat)
        while True:  # a peer that went away fails the op everywhere and leaves `flat` intact: retry
            try:
                tx_bytes += comm.all_reduce(flat, flat, op=ReduceOp.AVG, tag=0).tx_bytes
                break
            except PCCLError as e:
                if e.result not in (Result.RANK_CONNECTION_LOST, Result.RANK_CONNECTION_FAILED):
                    raise
        torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % PROGRESS_EVERY == 0:
            events.put({"kind": "progress", "index": index, "inner_steps": PROGRESS_EVERY})
    seconds = time.perf_counter() - started
    loss, accuracy = evaluate(model, test)
    return {"loss": loss, "accuracy": accuracy, "tx_bytes": tx_bytes, "seconds": seconds}


def peer(events, master: str, index: int, peers: int, inner_steps: int, outer_steps: int) -> None:
    import torch

    import pccl

    torch.set_num_threads(1)  # several peers share this machine's cores
    shard, test = load_split(index, peers)
    comm = pccl.Communicator(master, peer_group=0, p2p_connection_pool_size=1)
    comm.connect(n_attempts=20)
    wait_for_peers(comm, peers)
    diloco = train_diloco(events, comm, index, shard, test, inner_steps, outer_steps)
    data_parallel = train_data_parallel(events, comm, index, shard, test, inner_steps * outer_steps)
    events.put({"kind": "result", "index": index, "diloco": diloco, "data_parallel": data_parallel})
    comm.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, help="peers in the group (default 4; --smoke: 2)")
    parser.add_argument("--inner-steps", type=int, help="H, inner steps per outer step (default 50; --smoke: 20)")
    parser.add_argument("--outer-steps", type=int, help="outer steps (default 40; --smoke: 30)")
    parser.add_argument("--master", help="HOST:PORT of a running master; default: start one here")
    parser.add_argument("--index", type=int, help="with --master: run only peer INDEX here")
    parser.add_argument("--smoke", action="store_true", help="2 peers, 600 inner steps: a quick check")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="give up after this long")
    args = parser.parse_args()
    peers = args.peers or (2 if args.smoke else 4)
    inner_steps = args.inner_steps or (20 if args.smoke else 50)
    outer_steps = args.outer_steps or (30 if args.smoke else 40)
    indices = [args.index] if args.index is not None else list(range(peers))

    results = []
    with Launcher(args.master, args.timeout_s) as run:
        print(f"master {run.master}; peer(s) {indices} of {peers}; {outer_steps} outer steps of H={inner_steps} "
              f"inner steps = {inner_steps * outer_steps} steps per run")
        for i in indices:
            run.start(f"peer {i}", peer, run.master, i, peers, inner_steps, outer_steps)
        with tqdm(total=2 * inner_steps * outer_steps, desc=f"peer {indices[0]}: DiLoCo, then data-parallel",
                  unit="step") as bar:
            for event in run.follow():
                if event["kind"] == "result":
                    results.append(event)
                elif event["index"] == indices[0]:  # the bar follows one peer; the others keep pace
                    bar.update(event["inner_steps"])
    if len(results) != len(indices):
        print(f"summary: only {len(results)} of {len(indices)} peers reported results")
        return 1

    diloco = [r["diloco"] for r in results]
    data_parallel = [r["data_parallel"] for r in results]
    sent = {"DiLoCo": sum(r["tx_bytes"] for r in diloco), "data-parallel": sum(r["tx_bytes"] for r in data_parallel)}
    print(f"{'':26s} {'test loss':>9s} {'accuracy':>8s} {'bytes sent by ' + str(len(results)) + ' peer(s)':>24s} "
          f"{'seconds':>7s}")
    for name, run_results in (("DiLoCo", diloco), ("data-parallel", data_parallel)):
        r = run_results[0]
        label = f"{name} (H={inner_steps})" if name == "DiLoCo" else f"{name} (every step)"
        print(f"{label:26s} {r['loss']:9.4f} {100 * r['accuracy']:7.1f}% {sent[name]:24,d} {r['seconds']:7.1f}")

    same_state = len({r["digest"] for r in diloco}) == 1
    loss_ok = diloco[0]["loss"] <= (1 + LOSS_TOLERANCE) * data_parallel[0]["loss"]
    ratio = sent["data-parallel"] / sent["DiLoCo"]
    print(f"check: DiLoCo's outer state is identical on the {len(results)} peer(s) here (digest "
          f"{', '.join(sorted({r['digest'][:16] for r in diloco}))}): {'passed' if same_state else 'FAILED'}")
    print(f"check: DiLoCo's test loss {diloco[0]['loss']:.4f} is within {100 * LOSS_TOLERANCE:.0f}% of "
          f"data-parallel's {data_parallel[0]['loss']:.4f} (ratio {diloco[0]['loss'] / data_parallel[0]['loss']:.3f}): "
          f"{'passed' if loss_ok else 'FAILED'}")
    bytes_ok = ratio >= (1 - BYTES_TOLERANCE) * inner_steps
    print(f"check: DiLoCo sent {ratio:.2f}x fewer bytes, at least H={inner_steps}x less {100 * BYTES_TOLERANCE:.0f}% "
          f"for its contributor counts: {'passed' if bytes_ok else 'FAILED'}")
    return 0 if same_state and loss_ok and bytes_ok else 1


if __name__ == "__main__":
    run_main(main)
