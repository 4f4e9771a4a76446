"""From numpy arrays and torch tensors to the raw pointers the core works on.

Everything is checked here, before anything is sent: a bad buffer found mid-operation would fail
the operation for every peer in the group, not only for the caller who made the mistake.
The core only reads and writes host memory. CUDA tensors are therefore staged through pinned host
copies (``Staging``): copied in before the operation, copied back into ``recv`` after success.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pccl._lazy import is_torch_tensor, require_torch
from pccl._types import DataType, DeviceType

_TORCH_DEVICES = {"cpu": DeviceType.CPU, "cuda": DeviceType.CUDA}


@dataclass(frozen=True)
class Buffer:
    """A contiguous run of ``numel`` elements at ``ptr`` (0 when empty); ``obj`` keeps it alive."""

    ptr: int
    numel: int
    dtype: DataType
    device: DeviceType
    nbytes: int
    readonly: bool
    obj: Any = field(repr=False)


def _dtype_of(convert: Any, dtype: Any, arg: str) -> DataType:
    try:
        return convert(dtype)
    except ValueError as exc:
        raise ValueError(f"{arg}: {exc}") from None


def as_buffer(obj: Any, arg: str) -> Buffer:
    """Describe ``obj`` (argument ``arg``) as a Buffer, or raise TypeError/ValueError naming ``arg``."""
    if isinstance(obj, np.ndarray):
        # Only C order is accepted: an F-ordered recv would receive elements in a different order
        # from the one the other peers reduce in.
        if not obj.flags.c_contiguous:
            raise ValueError(f"{arg} must be C-contiguous (use np.ascontiguousarray)")
        dtype = _dtype_of(DataType.from_numpy_dtype, obj.dtype, arg)
        ptr = int(obj.__array_interface__["data"][0]) if obj.size else 0
        return Buffer(ptr, int(obj.size), dtype, DeviceType.CPU, int(obj.nbytes), not obj.flags.writeable, obj)
    if is_torch_tensor(obj):
        torch = require_torch(arg)
        if obj.layout is not torch.strided:
            raise ValueError(f"{arg} must be a dense tensor, not {obj.layout}")
        device = _TORCH_DEVICES.get(obj.device.type)
        if device is None:
            raise ValueError(f"{arg} is on device {obj.device}; only cpu and cuda tensors are supported")
        if not obj.is_contiguous():
            raise ValueError(f"{arg} must be contiguous (use .contiguous())")
        dtype = _dtype_of(DataType.from_torch_dtype, obj.dtype, arg)
        numel = int(obj.numel())
        ptr = int(obj.data_ptr()) if numel else 0
        return Buffer(ptr, numel, dtype, device, numel * dtype.itemsize, False, obj)
    raise TypeError(f"{arg} must be a numpy.ndarray or a torch.Tensor, not {type(obj).__module__}.{type(obj).__name__}")


def validate_pair(send: Any, recv: Any) -> tuple[Buffer, Buffer]:
    """Check an all-reduce's send and recv against each other; return their Buffers.

    In place means the very same memory (same start, same size); any other overlap would make the
    core read values it has already overwritten, so it is refused.
    """
    s, r = as_buffer(send, "send"), as_buffer(recv, "recv")
    if s.device is not r.device:
        raise ValueError(
            f"send and recv must be on the same device: send is on {s.device.name}, recv on {r.device.name}")
    if s.dtype is not r.dtype:
        raise ValueError(f"send and recv dtypes differ: send is {s.dtype.name}, recv is {r.dtype.name}")
    if s.numel != r.numel:
        raise ValueError(f"send and recv sizes differ: send has {s.numel} elements, recv has {r.numel}")
    if r.readonly:
        raise ValueError("recv is read-only; the result is written into it")
    if s.nbytes and s.ptr != r.ptr and s.ptr < r.ptr + r.nbytes and r.ptr < s.ptr + s.nbytes:
        raise ValueError("send and recv partially overlap; pass the same buffer twice for an in-place all-reduce")
    return s, r


def is_in_place(send: Buffer, recv: Buffer) -> bool:
    """Whether send and recv are the same memory (validated pairs are either this or disjoint)."""
    return send.ptr == recv.ptr and send.nbytes == recv.nbytes


class Staging:
    """The host pointers one operation runs on, and the copy back once it is over.

    CPU buffers are used in place (``finish`` does nothing). CUDA buffers get pinned host copies:
    send is copied in now; recv is copied back in ``finish(True)`` only, so a failed operation leaves
    the CUDA recv tensor untouched (the core restores the host copy of an in-place buffer itself).
    The staging copies stay referenced until ``finish``, because the core writes into them until then.
    """

    def __init__(self, send: Buffer, recv: Buffer) -> None:
        self._recv: Buffer | None = recv
        self._host: tuple[Any, Any] | None = None
        self.send_ptr, self.recv_ptr = send.ptr, recv.ptr
        if send.device is DeviceType.CPU or send.numel == 0:
            return
        torch = require_torch("staging a CUDA tensor")
        host_send = torch.empty(send.numel, dtype=send.obj.dtype, pin_memory=True)
        host_send.copy_(send.obj.reshape(-1))  # blocking: waits for kernels still writing send
        if is_in_place(send, recv):
            host_recv = host_send
        else:
            host_recv = torch.empty(recv.numel, dtype=recv.obj.dtype, pin_memory=True)
        self._host = (host_send, host_recv)
        self.send_ptr, self.recv_ptr = int(host_send.data_ptr()), int(host_recv.data_ptr())

    def finish(self, success: bool) -> None:
        """Copy the result back into a CUDA recv on success; release the staging copies. Idempotent."""
        recv, host = self._recv, self._host
        self._recv = self._host = None
        if success and recv is not None and host is not None:
            recv.obj.view(-1).copy_(host[1])
