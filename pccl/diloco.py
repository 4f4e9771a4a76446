"""DiLoCo and asynchronous DiLoCo over pccl, for PyTorch models.

Each peer trains its own copy of the model for ``inner_steps`` steps with its own inner optimizer;
then the peers all-reduce their *pseudo-gradients* (how far the outer parameters moved) and apply
one outer-optimizer step (Nesterov SGD by default; plain SGD in asynchronous mode, see
``default_async_outer_optimizer``) to the shared outer parameters. Communication is
``inner_steps`` times rarer than data-parallel training.

    diloco = DiLoCo(model, inner_optimizer, comm, inner_steps=50)
    diloco.join()                          # start from the run's shared parameters
    while diloco.outer_step < total_outer_steps:
        loss_fn(model, next(batches)).backward()
        inner_optimizer.step(); inner_optimizer.zero_grad()
        report = diloco.step()             # every inner_steps-th call: the outer step
    diloco.finish()                        # asynchronous: apply the reduce still in flight (one more step)

What this object keeps bit-identical on every peer, and re-checks with ``sync_shared_state`` (hash,
elect, fetch) at the start of every inner phase: the outer parameters (float32, on CPU), the outer
optimizer's state and the outer step counter (which is also the shared state's revision). The model
is reset to the outer parameters at the start of every phase, so a late joiner, or a peer that was
dropped and reconnected, starts exactly where everybody else does.

The rules that keep it so:
- Membership changes (``update_topology``) and shared-state syncs happen only at phase boundaries,
  when no all-reduce is in flight.
- Pseudo-gradients are all-reduced with SUM together with a contributor count (1 from a peer that
  trained the phase, 0 from one that joined since), and averaged by that count. If any piece of the
  batch fails (a peer died), the *whole* batch is reduced again on the surviving ring, out of place
  from intact inputs: every tensor is then averaged over the same peers, which AVG with per-piece
  retries would not guarantee.
- A step whose reduce is left with a single peer is discarded (the model goes back to the outer
  parameters) and the loop waits for peers.

``asynchronous=True`` overlaps communication with compute: the pseudo-gradients of phase t are
reduced in the background while phase t+1 trains, and applied one phase late. Every phase still
starts from the same outer parameters on every peer, and a peer joining mid-run receives the outer
state that already includes the reduce it missed (it contributes a zero with count 0 to the reduce
in flight when it joins).

FSDP: give each shard rank its own pccl peer group (``Communicator(..., peer_group=rank)``) and pass
the replica's own process group as ``replica_group``: the ranks of a replica then agree on when to
wait for peers, so one rank never trains alone while its siblings wait (which would deadlock FSDP's
collectives). Parameters that are DTensors contribute their local shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from pccl._descriptors import QuantizationOptions, SharedState, TensorInfo
from pccl._errors import PCCLError
from pccl._types import Attribute, ReduceOp, Result

# Ops of a DiLoCo batch use tags from here on, clear of the small tags user code tends to pick.
TAG_BASE = 1 << 40
# Each all-reduce op of a batch carries at most this many float32 values (64 MiB): big enough to
# stream, small enough that a retry after a failure redoes little and many ops overlap.
DEFAULT_BUCKET_ELEMENTS = 16 << 20
# How long the loop sleeps between membership polls while it waits for peers.
WAIT_POLL_S = 0.1
# connect() attempts when rejoining after this peer was dropped by the master.
REJOIN_ATTEMPTS = 20

_RETRY = frozenset({Result.RANK_CONNECTION_LOST, Result.RANK_CONNECTION_FAILED, Result.UPDATE_TOPOLOGY_FAILED,
                    Result.TOO_FEW_PEERS})


@dataclass(frozen=True)
class OuterStepReport:
    """What one outer step did on this peer."""

    outer_step: int         # the shared outer step counter after this step
    applied: bool           # False: discarded (left alone, or nobody contributed)
    world_size: int         # peers whose ring reduced the batch that was applied
    contributors: int       # peers whose pseudo-gradients are in it
    reduce_tx_bytes: int
    reduce_rx_bytes: int
    sync_tx_bytes: int      # the shared-state sync that started the next phase
    sync_rx_bytes: int
    waited_s: float         # time spent blocked (reduce wait, peers wait, sync)


def default_outer_optimizer(params: Iterable[Any]) -> Any:
    """Synchronous mode: Nesterov SGD, lr 0.7, momentum 0.9, the outer optimizer of the DiLoCo paper."""
    import torch
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def default_async_outer_optimizer(params: Iterable[Any]) -> Any:
    """Asynchronous mode: plain SGD, lr 0.5. Every phase starts from outer parameters that lack the
    previous phase's update, so consecutive pseudo-gradients largely repeat each other and both are
    applied; momentum on top of that one-phase delay oscillates and diverges (measured on the test
    regression, 2 peers, 10 inner steps: Nesterov 0.7/0.9 goes from loss 0.13 to 74 in 40 outer
    steps, lr 0.35 still to 5.2; plain SGD 0.5 falls to 0.005, against 0.0001 synchronously)."""
    import torch
    return torch.optim.SGD(params, lr=0.5)


class _Batch:
    """One pseudo-gradient all-reduce: SUM of the flat deltas plus a contributor count, in buckets."""

    def __init__(self, numel: int, bucket_elements: int) -> None:
        self.delta = np.zeros(numel, dtype=np.float32)   # send: never overwritten, so a retry is exact
        self.total = np.zeros(numel, dtype=np.float32)   # recv
        self.count_in = np.zeros(1, dtype=np.float32)
        self.count_out = np.zeros(1, dtype=np.float32)
        self.slices = [slice(i, min(i + bucket_elements, numel)) for i in range(0, numel, bucket_elements)]
        self.handles: list[Any] = []
        self.world = 0
        self.tx = self.rx = 0

    def launch(self, comm: Any, quantization: QuantizationOptions | None) -> None:
        self.handles = [comm.all_reduce_async(self.count_in, self.count_out, op=ReduceOp.SUM, tag=TAG_BASE)]
        for i, s in enumerate(self.slices):
            self.handles.append(comm.all_reduce_async(self.delta[s], self.total[s], op=ReduceOp.SUM,
                                                      tag=TAG_BASE + 1 + i, quantization_options=quantization))

    def wait(self) -> tuple[bool, int]:
        """Wait for every op; (all succeeded on one ring, the first failure's status).

        Ops that all succeeded may still have run on different rings: a peer that dies after the
        count op completed but before it launched the next op leaves that op to start (and succeed)
        on the survivors. The sums and the count would then disagree, so that counts as a failure.
        Within a phase membership only shrinks, so equal world sizes mean the same peers."""
        ok, status, worlds = True, Result.SUCCESS.value, set()
        for h in self.handles:
            good, code, info = h.wait()
            if good:
                worlds.add(info.local_world_size)
                self.world = info.local_world_size
                self.tx += info.tx_bytes
                self.rx += info.rx_bytes
            elif ok:
                ok, status = False, code
        self.handles = []
        if ok and len(worlds) > 1:
            return False, Result.RANK_CONNECTION_LOST.value
        return ok, status


class DiLoCo:
    """Synchronous or one-step-delayed (asynchronous) DiLoCo over a connected ``pccl.Communicator``."""

    def __init__(self, model: Any, inner_optimizer: Any, communicator: Any, *, inner_steps: int,
                 outer_optimizer: Callable[[list[Any]], Any] | None = None,
                 quantization: QuantizationOptions | None = None, asynchronous: bool = False,
                 replica_group: Any = None, bucket_elements: int = DEFAULT_BUCKET_ELEMENTS) -> None:
        import torch
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be a positive int, not {inner_steps!r}")
        if bucket_elements < 1:
            raise ValueError(f"bucket_elements must be positive, not {bucket_elements}")
        self.model, self.inner_optimizer, self.comm = model, inner_optimizer, communicator
        self.inner_steps, self.quantization, self.asynchronous = inner_steps, quantization, asynchronous
        self.replica_group = replica_group
        self._torch = torch

        self._params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("the model has no trainable parameters")
        for name, p in self._params:
            if not self._local(p).is_floating_point():
                raise ValueError(f"parameter {name!r} is {self._local(p).dtype}; DiLoCo needs floating point")
        sizes = [self._local(p).numel() for _, p in self._params]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        numel = int(self._offsets[-1])

        # The outer parameters: float32 CPU views into one flat buffer, first taken from this model.
        self._outer_flat = torch.zeros(numel, dtype=torch.float32)
        self.outer_params = []
        for (name, p), begin, end in zip(self._params, self._offsets[:-1], self._offsets[1:]):
            view = self._outer_flat[begin:end].view(self._local(p).shape)
            view.copy_(self._local(p).detach())
            self.outer_params.append(torch.nn.Parameter(view, requires_grad=True))
        default = default_async_outer_optimizer if asynchronous else default_outer_optimizer
        self.outer_optimizer = (outer_optimizer or default)(self.outer_params)
        self._materialise_outer_state()

        self._step_counter = torch.zeros(1, dtype=torch.int64)
        infos = [TensorInfo.from_torch(self._step_counter, "diloco/outer_step")]
        infos += [TensorInfo.from_torch(t.data, f"outer/{name}") for (name, _), t in zip(self._params, self.outer_params)]
        for (name, _), p in zip(self._params, self.outer_params):
            for key, value in sorted(self.outer_optimizer.state[p].items()):
                if torch.is_tensor(value):
                    infos.append(TensorInfo.from_torch(value, f"outer_opt/{name}/{key}"))
        self.shared_state = SharedState(infos)

        self._batches = [_Batch(numel, bucket_elements)] + ([_Batch(numel, bucket_elements)] if asynchronous else [])
        self._in_flight: _Batch | None = None   # asynchronous: the batch reducing during this phase
        self._inner_done = 0
        self._joined = False
        self._fresh = True                      # contributes count 0 until it has trained a phase

    # -- public ---------------------------------------------------------------------------------

    @property
    def outer_step(self) -> int:
        """Outer steps the run has applied (shared by every peer; also the shared state's revision)."""
        return int(self._step_counter[0])

    def join(self) -> tuple[int, int]:
        """Wait for peers, sync the shared state and reset the model to the outer parameters.

        Call once before training; ``step`` calls it when it was not. Returns the sync's (tx, rx).
        """
        tx_rx = self._begin_phase()
        if self.asynchronous:
            self._launch_next(self._idle_batch())  # a zero: this peer has trained nothing yet
        return tx_rx

    def step(self) -> OuterStepReport | None:
        """Count one inner step; on every ``inner_steps``-th call run the outer step and return a report."""
        if not self._joined:
            self.join()  # the inner steps taken so far started from unsynced parameters: reset
            return None
        self._inner_done += 1
        if self._inner_done < self.inner_steps:
            return None
        self._inner_done = 0
        return self._outer_step_async() if self.asynchronous else self._outer_step_sync()

    def finish(self) -> OuterStepReport | None:
        """Asynchronous mode: wait for the reduce in flight and apply it (call at the same outer step on
        every peer, e.g. once ``outer_step`` reaches the run's end). Synchronous mode: nothing to do."""
        if self._in_flight is None:
            return None
        t0 = time.perf_counter()
        batch, self._in_flight = self._in_flight, None
        applied, world, contributors = self._complete(batch)
        self._copy_outer_to_model()
        return OuterStepReport(self.outer_step, applied, world, contributors, batch.tx, batch.rx, 0, 0,
                               time.perf_counter() - t0)

    def state_digest(self) -> str:
        """A hash of the shared state (revision included): equal on every peer after every phase start."""
        import xxhash
        h = xxhash.xxh3_128()
        h.update(int(self.shared_state.revision).to_bytes(8, "little"))
        for info in self.shared_state.tensor_infos:
            h.update(info.name.encode())
            h.update(info.tensor.detach().cpu().contiguous().numpy())  # hashed in place, not copied
        return h.hexdigest()

    # -- the two loops -------------------------------------------------------------------------

    def _outer_step_sync(self) -> OuterStepReport:
        t0 = time.perf_counter()
        batch = self._batches[0]
        self._compute_delta(batch)
        applied, world, contributors = False, 1, 0
        if self._launchable():
            batch.launch(self.comm, self.quantization)
            applied, world, contributors = self._complete(batch)
        sync_tx, sync_rx = self._begin_phase()
        return OuterStepReport(self.outer_step, applied, world, contributors, batch.tx, batch.rx, sync_tx, sync_rx,
                               time.perf_counter() - t0)

    def _outer_step_async(self) -> OuterStepReport:
        t0 = time.perf_counter()
        # This phase's pseudo-gradient, against the outer parameters it started from, goes into the
        # batch that is not in flight.
        batch = self._idle_batch()
        self._compute_delta(batch)
        applied, world, contributors, tx, rx = False, 0, 0, 0, 0
        if self._in_flight is not None:  # the previous phase's reduce: apply it, one phase late
            previous, self._in_flight = self._in_flight, None
            applied, world, contributors = self._complete(previous)
            tx, rx = previous.tx, previous.rx
        sync_tx, sync_rx = self._begin_phase()
        self._launch_next(batch)
        return OuterStepReport(self.outer_step, applied, world, contributors, tx, rx, sync_tx, sync_rx,
                               time.perf_counter() - t0)

    # -- pieces --------------------------------------------------------------------------------

    def _begin_phase(self) -> tuple[int, int]:
        """At a phase boundary, with nothing in flight: admit newcomers, wait while alone, sync the
        shared state, reset the model to the outer parameters."""
        while True:
            self._ensure_connected()  # a master that stays unreachable is an error for the caller
            try:
                if self.comm.are_peers_pending():
                    self.comm.update_topology()
                if self._agreed_world() < 2:
                    time.sleep(WAIT_POLL_S)
                    continue
                self.shared_state.revision = self.outer_step
                info = self.comm.sync_shared_state(self.shared_state)
            except PCCLError as e:
                if e.result in _RETRY or not self.comm.connected:
                    continue
                raise
            self._joined = True
            self._copy_outer_to_model()
            return info.tx_bytes, info.rx_bytes

    def _complete(self, batch: _Batch) -> tuple[bool, int, int]:
        """Finish a launched batch, reducing it again on the surviving ring until it succeeds whole or
        this peer is alone; apply the outer step when it succeeded. (applied, world, contributors)."""
        while True:
            ok, status = batch.wait()
            if ok:
                break
            if not self.comm.connected:  # dropped: what the others applied comes with the next sync
                self._joined = False
                return False, 0, 0
            if Result(status) not in _RETRY:
                raise PCCLError(status, "DiLoCo pseudo-gradient all-reduce", "a piece failed and cannot be retried")
            if not self._launchable(agree=False):
                return False, 1, 0  # alone: discard this step
            batch.tx = batch.rx = 0
            batch.launch(self.comm, self.quantization)
        contributors = int(batch.count_out[0])
        if contributors == 0:
            return False, batch.world, 0
        self._apply_outer_step(batch.total, contributors)
        return True, batch.world, contributors

    def _launchable(self, agree: bool = True) -> bool:
        """Whether a reduce can run: connected with at least one other peer. With a replica group the
        replica's ranks agree (every rank calls this at the same points), except where only some
        ranks get there (``agree=False``: retries after a failure in this rank's own group)."""
        if not self.comm.connected:
            return False
        try:
            world = self._agreed_world() if agree else self.comm.get_attribute(Attribute.LOCAL_WORLD_SIZE)
        except PCCLError:
            return False
        return world >= 2

    def _idle_batch(self) -> _Batch:
        return self._batches[1] if self._in_flight is self._batches[0] else self._batches[0]

    def _launch_next(self, batch: _Batch) -> None:
        """Asynchronous mode, right after a phase start: every member launches exactly one batch
        here, so the batches of all peers line up, newcomers' (a zero, count 0) included."""
        if not self._joined or not self._launchable():
            return
        if self._fresh:  # joined (or rejoined) since this phase's delta was taken: nothing to add
            self._zero_delta(batch)
        self._in_flight = batch
        batch.launch(self.comm, self.quantization)

    def _compute_delta(self, batch: _Batch) -> None:
        """delta = outer - local for every parameter: how far this phase moved the model."""
        torch = self._torch
        delta = torch.from_numpy(batch.delta)
        for (_, p), begin, end in zip(self._params, self._offsets[:-1], self._offsets[1:]):
            local = self._local(p).detach().reshape(-1).to("cpu", torch.float32)
            torch.sub(self._outer_flat[begin:end], local, out=delta[begin:end])
        batch.count_in[0] = 1.0
        batch.count_out[0] = 0.0
        batch.tx = batch.rx = 0

    def _zero_delta(self, batch: _Batch) -> None:
        batch.delta.fill(0.0)
        batch.count_in[0] = 0.0
        batch.count_out[0] = 0.0
        batch.tx = batch.rx = 0
        self._fresh = False

    def _apply_outer_step(self, total: np.ndarray, contributors: int) -> None:
        torch = self._torch
        avg = torch.from_numpy(total)
        avg.div_(float(contributors))
        for p, begin, end in zip(self.outer_params, self._offsets[:-1], self._offsets[1:]):
            p.grad = avg[begin:end].view(p.shape)
        self.outer_optimizer.step()
        for p in self.outer_params:
            p.grad = None
        self._step_counter += 1

    def _copy_outer_to_model(self) -> None:
        with self._torch.no_grad():
            for (_, p), q in zip(self._params, self.outer_params):
                self._local(p).copy_(q.data)
        self._inner_done = 0

    def _materialise_outer_state(self) -> None:
        """Torch optimizers create their state on the first step; a zero-gradient step creates it now
        (moving nothing for SGD, Adam and the like) so it can be part of the shared state from the start."""
        for p in self.outer_params:
            p.grad = self._torch.zeros_like(p)
        before = self._outer_flat.clone()
        self.outer_optimizer.step()
        self._outer_flat.copy_(before)
        for p in self.outer_params:
            p.grad = None

    def _ensure_connected(self) -> None:
        if self.comm.connected:
            return
        # Dropped by the master (hung too long, or cut off): rejoin as a newcomer. What this peer
        # trained since its last sync is lost; the next sync brings the run's state.
        self._joined = False
        self._in_flight = None
        self._fresh = True
        self.comm.connect(n_attempts=REJOIN_ATTEMPTS)

    def _agreed_world(self) -> int:
        world = self.comm.get_attribute(Attribute.LOCAL_WORLD_SIZE)
        if self.replica_group is None:
            return world
        import torch.distributed as dist
        t = self._torch.tensor([world], dtype=self._torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.replica_group)
        return int(t[0])

    @staticmethod
    def _local(p: Any) -> Any:
        """A parameter's local tensor (the shard of a DTensor)."""
        return p.to_local() if hasattr(p, "to_local") else p.data
