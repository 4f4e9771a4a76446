"""The peer side: a thin, validating wrapper over ``pccl._core.Communicator``.

The core does the networking on its own reactor thread and releases the GIL in every call; this
layer checks arguments before anything is sent, turns result codes into ``PCCLError``, keeps buffers
alive while the core uses them, and stages CUDA tensors through host memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from pccl import _core
from pccl._buffers import Buffer, Staging, validate_pair
from pccl._descriptors import (
    CoreReduceArgs, QuantizationOptions, ReduceInfo, ReduceOpDescriptor, ReduceOperandDescriptor, SharedState,
    SharedStateSyncInfo, TensorInfo, core_reduce_args,
)
from pccl._errors import PCCLError
from pccl._hashing import digest_tensors
from pccl._types import Attribute, DataType, DeviceType, ReduceOp, Result, SharedStateSyncStrategy

# Failures that a retry on the shrunken ring can cure; anything else (a descriptor mismatch, being
# kicked, a lost master) would fail again, so all_reduce_multiple_with_retry raises it instead.
_RETRYABLE = frozenset({Result.RANK_CONNECTION_LOST.value, Result.RANK_CONNECTION_FAILED.value})


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), not {value}")
    return value


class AsyncReduceHandle:
    """A launched all-reduce. ``wait()`` never raises; it returns ``(is_success, status, info)``.

    Until waited, the handle keeps the buffers (and any CUDA staging copies) referenced, because the
    core reads and writes them until the operation is over.
    """

    def __init__(self, core_handle: Any, staging: Staging, keepalive: tuple[Any, ...], tag: int,
                 on_done: Callable[[AsyncReduceHandle], None]) -> None:
        self.tag = tag
        self.message = ""  # the core's reason for a failure, once waited
        self._handle = core_handle
        self._staging: Staging | None = staging
        self._keepalive = keepalive
        self._on_done = on_done
        self._result: tuple[bool, int, ReduceInfo | None] | None = None
        self._lock = threading.Lock()

    def done(self) -> bool:
        """Whether ``wait()`` would return without blocking."""
        return self._result is not None or bool(self._handle.done())

    def wait(self) -> tuple[bool, int, ReduceInfo | None]:
        """Block until the operation is over; a second call returns the same tuple.

        Ctrl-C raises KeyboardInterrupt and leaves the handle waitable again.
        """
        with self._lock:
            if self._result is None:
                self._result = self._finish()
            return self._result

    def _finish(self) -> tuple[bool, int, ReduceInfo | None]:
        try:
            code, message, world, tx, rx = self._handle.wait()
        except Exception as exc:  # noqa: BLE001 - wait() must not raise; keep the buffers alive, state unknown
            self.message = f"waiting for the operation failed: {exc!r}"
            self._on_done(self)
            return False, Result.INTERNAL_ERROR.value, None
        ok = code == Result.SUCCESS.value
        try:
            assert self._staging is not None
            self._staging.finish(ok)
        except Exception as exc:  # noqa: BLE001 - e.g. the CUDA copy back failed
            ok, code, message = False, Result.INTERNAL_ERROR.value, f"copying the result back failed: {exc!r}"
        self.message = message
        self._staging, self._keepalive = None, ()
        self._on_done(self)
        return ok, int(code), ReduceInfo(world, tx, rx) if ok else None

    def __repr__(self) -> str:
        state = "pending" if self._result is None else f"done={self._result[:2]}"
        return f"AsyncReduceHandle(tag={self.tag}, {state})"


class Communicator:
    """One peer's membership in a peer group: connect, then all-reduce with the other members.

    ``p2p_connection_pool_size`` is the number of TCP connections to the ring's next peer (0: the
    default, 16); one operation's bytes are striped over all of them, which is what fills a long
    path whose every TCP flow is capped (see the README's WAN figures; on loopback 16 costs
    nothing). How long a silent peer is tolerated is the master's setting
    (``MasterNode(..., peer_timeout_s=...)``), so every peer of a run agrees on it.
    """

    def __init__(self, address: str, peer_group: int = 0, p2p_connection_pool_size: int = 0) -> None:
        if not isinstance(address, str):
            raise TypeError(f"address must be a str like 'host:port', not {type(address).__name__}")
        _check_int("peer_group", peer_group, 0, 1 << 32)
        pool = _check_int("p2p_connection_pool_size", p2p_connection_pool_size, 0, 1 << 16)  # 0: the core's default
        self._core = _core.Communicator(address, peer_group, pool)
        self._address = address
        self._peer_group = peer_group
        self._lock = threading.Lock()
        self._in_flight: set[AsyncReduceHandle] = set()
        self._abandoned: list[Any] = []  # staging copies of interrupted calls, kept alive for the core
        self._closed = False

    # -- membership --------------------------------------------------------------------------

    def connect(self, n_attempts: int = 5) -> None:
        """Register with the master; return once accepted (later peers: once the group admits them)."""
        _check_int("n_attempts", n_attempts, 1, 1 << 31)
        code, message = self._core.connect(n_attempts)
        PCCLError.check(code, "connect", message)

    def update_topology(self) -> None:
        """Collective: admit pending peers and rebuild the ring."""
        code, message = self._core.update_topology()
        PCCLError.check(code, "update_topology", message)

    def optimize_topology(self) -> None:
        """Collective: ``update_topology`` plus a bandwidth-aware ring.

        The master has every pair of peers not measured yet stream to each other briefly (pairs
        whose links are independent at once; rates cached per pair of hosts), then adopts the ring
        order whose slowest link is fastest. Every accepted peer calls it; with collectives in
        flight it raises ``PENDING_ASYNC_OPS``. When another peer calls ``update_topology`` at the
        same point instead, everyone gets a plain update (the ring is not reordered this time).
        """
        code, message = self._core.optimize_topology()
        PCCLError.check(code, "optimize_topology", message)

    def are_peers_pending(self) -> bool:
        """Collective query: whether peers wait to be admitted (all members get the same answer)."""
        code, message, pending = self._core.are_peers_pending()
        PCCLError.check(code, "are_peers_pending", message)
        return bool(pending)

    def get_attribute(self, attribute: Attribute) -> int:
        """World sizes and group counts; NOT_INITIALIZED before ``connect``."""
        code, message, value = self._core.get_attribute(Attribute(attribute).value)
        PCCLError.check(code, "get_attribute", message)
        return int(value)

    @property
    def peer_id(self) -> int:
        """This peer's id, assigned by the master on connect."""
        return int(self._core.peer_id)

    @property
    def connected(self) -> bool:
        """Whether this peer is currently a member (False before connect, after close or a kick)."""
        return bool(self._core.connected)

    # -- shared state --------------------------------------------------------------------------

    def sync_shared_state(self, shared_state: SharedState,
                          strategy: SharedStateSyncStrategy = SharedStateSyncStrategy.ENFORCE_POPULAR
                          ) -> SharedStateSyncInfo:
        """Collective per peer group: make every member's tensors and revision agree.

        Each peer hashes its entries; the group elects the most popular content at the newest
        revision; peers that differ or are behind fetch exactly the differing entries from up-to-date
        peers and check their hashes. Writes the synced revision back into ``shared_state``. CUDA
        tensors are hashed on the GPU and staged through pinned host copies only when this peer
        sends or receives data (copied back only where data arrived and the sync succeeded).
        """
        if not isinstance(shared_state, SharedState):
            raise TypeError(f"shared_state must be a SharedState, not {type(shared_state).__name__}")
        on_device = [info.device_type is DeviceType.CUDA for info in shared_state.tensor_infos]
        return self._sync_shared_state(shared_state, strategy, on_device)

    def _sync_shared_state(self, shared_state: SharedState, strategy: SharedStateSyncStrategy,
                           hashed_in_place: list[bool]) -> SharedStateSyncInfo:
        """``hashed_in_place[i]``: entry i is hashed by torch where it lives and staged on demand
        (always so for CUDA tensors; the tests also use it for CPU tensors)."""
        strategy = SharedStateSyncStrategy(strategy)
        self._reap()
        with self._lock:
            if self._in_flight:
                raise PCCLError(Result.PENDING_ASYNC_OPS, "sync_shared_state",
                                f"{len(self._in_flight)} all-reduce(s) still in flight; wait for them first")
        infos = shared_state.tensor_infos
        buffers = [self._info_buffer(info) for info in infos]
        in_place = [i for i, flag in enumerate(hashed_in_place) if flag]
        digests = dict(zip(in_place, digest_tensors([infos[i].tensor for i in in_place]))) if in_place else {}
        stagings = [None if i in digests else Staging(buf, buf) for i, buf in enumerate(buffers)]

        def stage() -> list[int]:
            for i in in_place:
                if stagings[i] is None:
                    stagings[i] = Staging(buffers[i], buffers[i])
            return [st.send_ptr for st in stagings]

        entries = [(info.name, 0 if st is None else st.send_ptr, info.numel, info.dtype.value,
                    bool(info.allow_content_inequality), digests.get(i, b""))
                   for i, (info, st) in enumerate(zip(infos, stagings))]
        code, rx = None, 0
        try:
            code, message, revision, tx, rx = self._core.sync_shared_state(
                shared_state.revision, entries, strategy.value, stage if in_place else None)
        finally:
            for st in stagings:
                if st is not None:
                    st.finish(code == Result.SUCCESS.value and rx > 0)
        PCCLError.check(code, "sync_shared_state", message)
        shared_state.revision = int(revision)
        return SharedStateSyncInfo(tx, rx)

    @staticmethod
    def _info_buffer(info: TensorInfo) -> Buffer:
        if info.device_type is DeviceType.CUDA and info.tensor is None:
            raise ValueError(f"CUDA tensor {info.name!r} must be described with TensorInfo.from_torch")
        return Buffer(info.data_ptr, info.numel, info.dtype, info.device_type, info.numel * info.dtype.itemsize,
                      False, info.tensor)

    # -- all-reduce ----------------------------------------------------------------------------

    def all_reduce(self, send: Any, recv: Any, *, op: ReduceOp = ReduceOp.SUM, tag: int = 0,
                   operand_descriptor: ReduceOperandDescriptor | None = None,
                   quantization_options: QuantizationOptions | None = None) -> ReduceInfo:
        """Reduce ``send`` over the group into ``recv`` (``send is recv``: in place); raise on failure.

        On failure ``recv`` is left as it was (in place: restored bit for bit), so a retry is safe.
        """
        handle = self._all_reduce_async("all_reduce", send, recv, op, tag, operand_descriptor, quantization_options)
        ok, status, info = handle.wait()
        if not ok:
            raise PCCLError(status, "all_reduce", handle.message)
        assert info is not None
        return info

    def all_reduce_async(self, send: Any, recv: Any, *, op: ReduceOp = ReduceOp.SUM, tag: int = 0,
                         operand_descriptor: ReduceOperandDescriptor | None = None,
                         quantization_options: QuantizationOptions | None = None) -> AsyncReduceHandle:
        """Launch an all-reduce; concurrent ones need distinct tags (a tag in flight: INVALID_ARGUMENT)."""
        return self._all_reduce_async("all_reduce_async", send, recv, op, tag, operand_descriptor,
                                      quantization_options)

    def _all_reduce_async(self, func_name: str, send: Any, recv: Any, op: Any, tag: Any,
                          operand_descriptor: ReduceOperandDescriptor | None,
                          quantization_options: QuantizationOptions | None) -> AsyncReduceHandle:
        s, r = validate_pair(send, recv)
        args = core_reduce_args(s.numel, s.dtype, op, tag, operand_descriptor, quantization_options)
        return self._launch(func_name, s, r, args)

    def _launch(self, func_name: str, send: Buffer, recv: Buffer, args: CoreReduceArgs) -> AsyncReduceHandle:
        self._reap()
        staging = Staging(send, recv)
        try:
            with self._lock:
                if any(h.tag == args.tag for h in self._in_flight):
                    raise PCCLError(Result.INVALID_ARGUMENT, func_name, f"tag {args.tag} is still in flight")
                core_handle = self._core.all_reduce_async(
                    staging.send_ptr, staging.recv_ptr, args.count, args.dtype, args.op, args.tag,
                    args.quant_algorithm, args.quant_dtype)
                handle = AsyncReduceHandle(core_handle, staging, (send.obj, recv.obj), args.tag, self._forget)
                self._in_flight.add(handle)
        except BaseException:
            staging.finish(False)
            raise
        return handle

    def _forget(self, handle: AsyncReduceHandle) -> None:
        with self._lock:
            self._in_flight.discard(handle)

    def _reap(self) -> None:
        """Finish operations that are over but were never waited (their tags are free again)."""
        with self._lock:
            over = [h for h in self._in_flight if h.done()]
        for handle in over:
            handle.wait()

    def all_reduce_multiple_with_retry(self, descriptors: Sequence[ReduceOpDescriptor], *,
                                       max_in_flight: int = 4) -> ReduceInfo:
        """All-reduce every piece, up to ``max_in_flight`` at once, retrying failed pieces.

        When a piece fails, the others in flight are waited for, then the failed ones are launched
        again on the surviving ring, as long as at least two peers remain (TOO_FEW_PEERS otherwise).
        Returns the bytes moved by all successful pieces and the group size of the last one.
        """
        func = "all_reduce_multiple_with_retry"
        _check_int("max_in_flight", max_in_flight, 1, 1 << 31)
        pieces = [self._piece(d) for d in descriptors]
        tags = [args.tag for _, _, args in pieces]
        if len(set(tags)) != len(tags):
            raise ValueError(f"the descriptors' tags must be distinct, got {tags}")
        pending: deque[int] = deque(range(len(pieces)))
        running: deque[tuple[int, AsyncReduceHandle]] = deque()
        failed: list[int] = []
        error: tuple[int, str] | None = None
        world, tx, rx = None, 0, 0
        try:
            while pending or running or failed:
                if failed and not running:
                    if error is not None:
                        raise PCCLError(error[0], func, error[1])
                    world = self.get_attribute(Attribute.LOCAL_WORLD_SIZE)
                    if world < 2:
                        raise PCCLError(Result.TOO_FEW_PEERS, func, f"{len(failed)} piece(s) failed, peer alone")
                    pending.extendleft(reversed(failed))
                    failed.clear()
                while pending and not failed and len(running) < max_in_flight:
                    i = pending.popleft()
                    running.append((i, self._launch(func, *pieces[i])))
                i, handle = running.popleft()
                ok, status, info = handle.wait()
                if ok:
                    assert info is not None
                    world, tx, rx = info.local_world_size, tx + info.tx_bytes, rx + info.rx_bytes
                    continue
                failed.append(i)
                if status not in _RETRYABLE and error is None:
                    error = (status, handle.message)
        except Exception:
            for _, handle in running:  # return only once the core is done with every buffer
                handle.wait()
            raise
        if world is None:  # no pieces at all
            world = self.get_attribute(Attribute.LOCAL_WORLD_SIZE)
        return ReduceInfo(world, tx, rx)

    @staticmethod
    def _piece(desc: ReduceOpDescriptor) -> tuple[Buffer, Buffer, CoreReduceArgs]:
        """Validate one descriptor; raw-pointer descriptors are taken as host memory, as given."""
        if not isinstance(desc, ReduceOpDescriptor):
            raise TypeError(f"descriptors must hold ReduceOpDescriptor, not {type(desc).__name__}")
        d = desc.reduce_descriptor
        if desc.buffers is not None:
            send, recv = desc.buffers
        else:
            dtype = DataType(d.operand_descriptor.datatype)
            count = _check_int("reduce_descriptor.count", d.count, 0, 1 << 63)
            nbytes = count * dtype.itemsize
            if count and not (desc.sendbuf_ptr and desc.recvbuf_ptr):
                raise ValueError("a ReduceOpDescriptor with count > 0 has a null buffer pointer")
            send = Buffer(desc.sendbuf_ptr, count, dtype, DeviceType.CPU, nbytes, False, None)
            recv = Buffer(desc.recvbuf_ptr, count, dtype, DeviceType.CPU, nbytes, False, None)
        if d.count != send.numel:
            raise ValueError(f"reduce_descriptor.count is {d.count} but the buffers hold {send.numel} elements")
        args = core_reduce_args(send.numel, send.dtype, d.op, d.tag, d.operand_descriptor, d.quantization_options)
        return send, recv, args

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the group and stop the reactor; operations still in flight fail. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._core.close()
        with self._lock:
            left = list(self._in_flight)
        for handle in left:  # the core has failed them: this only releases their buffers
            handle.wait()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser (e.g. at interpreter exit)
            pass

    def __repr__(self) -> str:
        return f"Communicator(address={self._address!r}, peer_group={self._peer_group})"
