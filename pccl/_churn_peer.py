"""A DiLoCo training peer driven by the churn engine (``pccl._churn``).

    python -m pccl._churn_peer '<json spec>'

It trains a small MLP on a synthetic regression problem (a sum of sines of random projections of
the input: hard enough that the loss keeps falling for a few minutes) with ``pccl.diloco.DiLoCo``
until it is killed, and reports what it does as JSON lines on stdout, one object per line with ``event`` and
``t`` (wall-clock seconds):

- ``started``: imports done, about to connect (``pid``).
- ``connected``: ``connect()`` returned, first time or a rejoin after being dropped (``peer_id``).
- ``joined``: ``DiLoCo.join()`` returned (``step``, ``digest``: the shared state's hash).
- ``reduce``: the pseudo-gradient all-reduce was just launched (``step``).
- ``sync``: a shared-state sync is starting (``step``).
- ``outer``: ``DiLoCo.step()`` returned a report (``step``, ``applied``, ``world``,
  ``contributors``, ``digest``, ``loss``: the mean squared error of the shared outer parameters on a
  fixed validation set, the same on every peer; ``op_worlds``: the world size each op of the last
  fully successful reduce attempt ran with, which for an applied step must all be one ring).
- ``dying``: about to SIGKILL itself on command (``point``).
- ``error``: an exception ended the peer (``error``, ``traceback``); the process then exits with 1.

Commands arrive on stdin, one per line: ``die reduce`` (SIGKILL itself right after its next
pseudo-gradient reduce is launched, so the reduce is in flight on every other peer), ``die between``
(SIGKILL itself once the contributor count of its next reduce is done, before launching the
pseudo-gradient: DiLoCo reduces the two as separate ops) and ``die sync`` (SIGKILL itself a moment
into its next shared-state sync). This is how the engine lands kills at exactly those points, which
a kill from outside would hit only by luck.

The spec (JSON) has ``master``, ``seed``, ``inner_steps``, ``inner_step_sleep_s``, ``hidden``,
``quantize``, ``asynchronous``, ``outer_optimizer`` (``"default"``: DiLoCo's default for the mode,
Nesterov SGD 0.7/0.9 when synchronous, plain SGD 0.5 when asynchronous; ``"sgd"``: plain SGD 0.5
in both modes); or ``{"probe": true, "master": ...}``, which only connects, reports
``connected`` with ``world`` (the master's accepted peers including the probe) and leaves: the
engine's check that the master still answers.

torch is imported only here, in the training path, so the probe starts quickly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from typing import Any

import pccl
from pccl.communicator import Communicator

# connect() attempts (0.5 s apart) before a peer gives up on reaching the master.
CONNECT_ATTEMPTS = 20
# Inputs of the synthetic regression problem, its random projections, samples per inner step and
# in the validation set.
FEATURES = 8
PROJECTIONS = 4
BATCH_SIZE = 64
VALIDATION_SIZE = 256
INNER_LEARNING_RATE = 1e-2
# Seed of the ground-truth weights and the validation set: the same problem on every peer.
PROBLEM_SEED = 7
# "die sync": the self-kill fires this long (at most) after the sync call starts, inside it.
SYNC_DEATH_MAX_DELAY_S = 0.005
# Learning rate of the "sgd" outer optimizer.
OUTER_SGD_LEARNING_RATE = 0.5
# Reduce attempts remembered for the op_worlds report (the applied one is at most one launch back).
REMEMBERED_ATTEMPTS = 4
DEATH_POINTS = ("reduce", "between", "sync")

_print_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Write one JSON event line to stdout (any thread)."""
    line = json.dumps({"event": event, "t": time.time(), **fields})
    with _print_lock:
        print(line, flush=True)


class DeathOrders:
    """The ``die ...`` commands read from stdin: where this peer is to SIGKILL itself next."""

    def __init__(self) -> None:
        self._armed: set[str] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._read_commands, name="commands", daemon=True).start()

    def _read_commands(self) -> None:
        for line in sys.stdin:
            words = line.split()
            if len(words) == 2 and words[0] == "die" and words[1] in DEATH_POINTS:
                with self._lock:
                    self._armed.add(words[1])
            elif words:
                emit("error", error=f"unknown command {line.strip()!r}", traceback="")

    def take(self, point: str) -> bool:
        """Whether a death at ``point`` was ordered (the order is used up)."""
        with self._lock:
            if point in self._armed:
                self._armed.discard(point)
                return True
            return False


def die(point: str) -> None:
    emit("dying", point=point)
    os.kill(os.getpid(), signal.SIGKILL)


class ReduceAttempts:
    """The outcomes of DiLoCo's reduce attempts, each a contributor-count op and its buckets."""

    def __init__(self) -> None:
        self._attempts: list[list[Any]] = []   # per attempt: one outcome per op, None until waited

    def begin(self) -> None:
        self._attempts = self._attempts[-(REMEMBERED_ATTEMPTS - 1):] + [[]]

    def watch(self, handle: Any) -> Any:
        """The handle, wrapped so its outcome lands in the current attempt when DiLoCo waits for it."""
        attempt = self._attempts[-1]
        attempt.append(None)
        return _WatchedHandle(handle, attempt, len(attempt) - 1)

    def last_success_worlds(self) -> list[int]:
        """The world size of each op of the latest attempt whose ops were all waited and succeeded."""
        for attempt in reversed(self._attempts):
            if attempt and all(outcome is not None and outcome[0] for outcome in attempt):
                return [outcome[1].local_world_size for outcome in attempt]
        return []


class _WatchedHandle:
    """An AsyncReduceHandle that records its outcome in its attempt when waited."""

    def __init__(self, handle: Any, attempt: list[Any], index: int) -> None:
        self._handle, self._attempt, self._index = handle, attempt, index

    def wait(self) -> tuple[bool, int, Any]:
        ok, status, info = self._handle.wait()
        self._attempt[self._index] = (ok, info)
        return ok, status, info

    def done(self) -> bool:
        return self._handle.done()


class InstrumentedCommunicator(Communicator):
    """A Communicator that reports connects, reduce launches and syncs, records each reduce
    attempt's op outcomes, and dies at those points on command."""

    def __init__(self, address: str, deaths: DeathOrders, outer_step: Any) -> None:
        super().__init__(address, peer_group=0, p2p_connection_pool_size=1)
        self._deaths = deaths
        self._outer_step = outer_step  # a callable: the DiLoCo object's outer step, once it exists
        self.attempts = ReduceAttempts()

    def connect(self, n_attempts: int = CONNECT_ATTEMPTS) -> None:
        super().connect(n_attempts)
        emit("connected", peer_id=self.peer_id)

    def all_reduce_async(self, send: Any, recv: Any, **kwargs: Any) -> Any:
        from pccl.diloco import TAG_BASE
        tag = kwargs.get("tag", 0)
        if tag == TAG_BASE:
            self.attempts.begin()
        handle = super().all_reduce_async(send, recv, **kwargs)
        if tag < TAG_BASE:
            return handle
        handle = self.attempts.watch(handle)
        # DiLoCo launches its contributor count (TAG_BASE), then the pseudo-gradient buckets; the
        # model here fits one bucket (TAG_BASE + 1), so after this launch the whole batch is in flight.
        if tag == TAG_BASE and self._deaths.take("between"):
            handle.wait()
            die("between")
        if tag == TAG_BASE + 1:
            emit("reduce", step=self._outer_step())
            if self._deaths.take("reduce"):
                die("reduce")
        return handle

    def sync_shared_state(self, shared_state: Any, *args: Any, **kwargs: Any) -> Any:
        emit("sync", step=self._outer_step())
        if self._deaths.take("sync"):
            threading.Timer(random.uniform(0.0, SYNC_DEATH_MAX_DELAY_S), die, args=("sync",)).start()
        return super().sync_shared_state(shared_state, *args, **kwargs)


def sgd_outer_optimizer(params: Any) -> Any:
    """The "sgd" outer optimizer: plain SGD, no momentum."""
    import torch
    return torch.optim.SGD(params, lr=OUTER_SGD_LEARNING_RATE)


def probe(spec: dict[str, Any]) -> None:
    """Connect, report the master's world size as this newcomer sees it, leave."""
    comm = pccl.Communicator(spec["master"], peer_group=0, p2p_connection_pool_size=1)
    comm.connect(n_attempts=CONNECT_ATTEMPTS)
    emit("connected", peer_id=comm.peer_id, world=comm.get_attribute(pccl.Attribute.GLOBAL_WORLD_SIZE))
    comm.close()


def train(spec: dict[str, Any]) -> None:
    """Train until killed, reporting every outer step."""
    import torch

    from pccl.diloco import DiLoCo

    torch.set_num_threads(1)
    torch.manual_seed(spec["seed"])  # every peer starts from its own weights: the first sync decides
    problem = torch.Generator().manual_seed(PROBLEM_SEED)
    projections = torch.randn(FEATURES, PROJECTIONS, generator=problem)

    def target(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x @ projections).sum(dim=1, keepdim=True) / 2

    validation_x = torch.randn(VALIDATION_SIZE, FEATURES, generator=problem)
    validation_y = target(validation_x)
    data = torch.Generator().manual_seed(spec["seed"])  # this peer's own stream of training samples

    hidden = spec["hidden"]
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
    inner_optimizer = torch.optim.AdamW(model.parameters(), lr=INNER_LEARNING_RATE)
    quantization = (pccl.QuantizationOptions(pccl.DataType.UINT8, pccl.QuantizationAlgorithm.MIN_MAX)
                    if spec["quantize"] else None)
    diloco: DiLoCo | None = None
    comm = InstrumentedCommunicator(spec["master"], DeathOrders(), lambda: diloco.outer_step if diloco else 0)
    emit("started", pid=os.getpid())
    comm.connect(n_attempts=CONNECT_ATTEMPTS)
    outer_optimizer = sgd_outer_optimizer if spec["outer_optimizer"] == "sgd" else None  # None: DiLoCo's default
    diloco = DiLoCo(model, inner_optimizer, comm, inner_steps=spec["inner_steps"], quantization=quantization,
                    asynchronous=spec["asynchronous"], outer_optimizer=outer_optimizer)
    diloco.join()
    emit("joined", step=diloco.outer_step, digest=diloco.state_digest())

    def validation_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(validation_x), validation_y))

    while True:
        x = torch.randn(BATCH_SIZE, FEATURES, generator=data)
        torch.nn.functional.mse_loss(model(x), target(x)).backward()
        inner_optimizer.step()
        inner_optimizer.zero_grad()
        time.sleep(spec["inner_step_sleep_s"])
        report = diloco.step()
        if report is not None:  # the model now holds the shared outer parameters
            emit("outer", step=report.outer_step, applied=report.applied, world=report.world_size,
                 contributors=report.contributors, digest=diloco.state_digest(), loss=validation_loss(),
                 op_worlds=comm.attempts.last_success_worlds())


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        probe(spec) if spec.get("probe") else train(spec)
    except Exception as exc:  # report, then fail the process: the engine counts it as an unexpected exit
        emit("error", error=repr(exc), traceback=traceback.format_exc())
        sys.exit(1)


if __name__ == "__main__":
    main()
