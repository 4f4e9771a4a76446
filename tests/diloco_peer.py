"""A DiLoCo training peer for the tests: a small MLP on synthetic regression data, reporting every
outer step (and a digest of its shared state) as JSON lines on stdout.

Usage: python diloco_peer.py '<json spec>'. Spec keys: master, index, outer_steps, inner_steps,
asynchronous, hidden, pool, quantize, world (wait for this many peers first), outer_lr and
outer_momentum, device (cpu or cuda), start_file (connect only once this file exists), inner_sleep
(seconds per inner step), die_at (outer step at which to SIGKILL itself) with die_in ("reduce": with the pseudo-gradient reduce half launched;
"sync": a moment into the shared-state sync; "inner": during the inner phase).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

import torch

import pccl
from pccl.diloco import TAG_BASE, DiLoCo
from peer_main import emit, join

torch.set_num_threads(1)


def die() -> None:
    emit(event="dying")
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    spec = json.loads(sys.argv[1])
    index = spec["index"]
    torch.manual_seed(1000 + index)  # every peer starts from different weights: the sync decides
    hidden = spec.get("hidden", 32)
    device = spec.get("device", "cpu")
    model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)).to(device)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if spec.get("start_file"):  # a late joiner: torch is imported, now wait for the test's go
        deadline = time.monotonic() + 120
        while not os.path.exists(spec["start_file"]):
            if time.monotonic() > deadline:
                raise TimeoutError("never told to start")
            time.sleep(0.01)
    comm = pccl.Communicator(spec["master"], p2p_connection_pool_size=spec.get("pool", 1))
    comm.connect(n_attempts=40)
    quant = pccl.QuantizationOptions(pccl.DataType.UINT8, pccl.QuantizationAlgorithm.MIN_MAX) \
        if spec.get("quantize") else None
    outer_optimizer = None
    if "outer_lr" in spec:
        momentum = spec.get("outer_momentum", 0.9)
        outer_optimizer = lambda params: torch.optim.SGD(  # noqa: E731
            params, lr=spec["outer_lr"], momentum=momentum, nesterov=momentum > 0)
    diloco = DiLoCo(model, inner, comm, inner_steps=spec.get("inner_steps", 4), quantization=quant,
                    asynchronous=spec.get("asynchronous", False), outer_optimizer=outer_optimizer)

    die_at, die_in = spec.get("die_at"), spec.get("die_in", "inner")
    if die_at is not None and die_in == "reduce":
        # Die between launching the first op of the pseudo-gradient batch and the next: the others'
        # reduce is then certainly in flight and cannot complete.
        real_launch = comm.all_reduce_async

        def launch_or_die(*args: Any, **kwargs: Any) -> Any:
            if diloco.outer_step >= die_at and kwargs.get("tag") == TAG_BASE + 1:
                die()
            return real_launch(*args, **kwargs)
        comm.all_reduce_async = launch_or_die
    if die_at is not None and die_in == "sync":
        real_sync = comm.sync_shared_state

        def sync_then_die(*args: Any, **kwargs: Any) -> Any:
            if diloco.outer_step >= die_at:
                threading.Timer(0.002, die).start()
            return real_sync(*args, **kwargs)
        comm.sync_shared_state = sync_then_die

    # Each peer sees its own slice of one regression problem.
    gen = torch.Generator().manual_seed(7)
    w_true = torch.randn(8, 1, generator=gen)
    data_gen = torch.Generator().manual_seed(100 + index)

    if spec.get("world"):  # start together: pump membership until this many peers are in
        join(comm, spec["world"])
    tx, rx = diloco.join()
    emit(event="joined", step=diloco.outer_step, digest=diloco.state_digest(), rx=rx,
         params=sum(p.numel() for p in model.parameters()))
    last_loss = float("nan")
    while diloco.outer_step < spec["outer_steps"]:
        x = torch.randn(64, 8, generator=data_gen)
        y = torch.tanh(x @ w_true).to(device)
        x = x.to(device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        inner.step()
        inner.zero_grad()
        last_loss = float(loss.detach())
        if spec.get("inner_sleep"):
            time.sleep(spec["inner_sleep"])
        if die_at is not None and die_in == "inner" and diloco.outer_step >= die_at:
            die()
        report = diloco.step()
        if report is not None:
            emit(event="outer", step=report.outer_step, applied=report.applied, world=report.world_size,
                 contributors=report.contributors, digest=diloco.state_digest(), loss=last_loss,
                 tx=report.reduce_tx_bytes, sync_rx=report.sync_rx_bytes, waited=report.waited_s)
    final = diloco.finish()
    emit(event="done", step=diloco.outer_step, final_applied=None if final is None else final.applied,
         digest=diloco.state_digest(), loss=last_loss)
    comm.close()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # report, then fail the process so the test sees it
        emit(event="error", error=repr(e))
        raise
