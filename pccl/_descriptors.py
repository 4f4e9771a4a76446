"""Plain value classes of the public API, and the checks that turn them into the core's arguments."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import numpy as np

from pccl._buffers import Buffer, as_buffer, validate_pair
from pccl._lazy import is_torch_tensor
from pccl._types import DataType, DeviceType, DistributionHint, QuantizationAlgorithm, ReduceOp

_U64 = 1 << 64


@dataclass
class ReduceOperandDescriptor:
    """The element type of an all-reduce's operands (must match the buffers) and a distribution hint."""

    datatype: DataType
    distribution_hint: DistributionHint = DistributionHint.NONE


@dataclass
class QuantizationOptions:
    """How to compress values on the wire; algorithm NONE (or no options at all) sends them as they are."""

    quantized_datatype: DataType = DataType.UINT8
    algorithm: QuantizationAlgorithm = QuantizationAlgorithm.MIN_MAX


@dataclass
class ReduceDescriptor:
    """Everything about one all-reduce except its buffers; the tag tells concurrent ones apart."""

    count: int
    op: ReduceOp
    tag: int
    operand_descriptor: ReduceOperandDescriptor
    quantization_options: QuantizationOptions | None = None


@dataclass
class ReduceInfo:
    """What an all-reduce did: the group's size when it ran and the bytes this peer moved."""

    local_world_size: int
    tx_bytes: int
    rx_bytes: int


@dataclass
class SharedStateSyncInfo:
    """Bytes this peer sent and received while synchronising shared state."""

    tx_bytes: int
    rx_bytes: int


@dataclass(frozen=True)
class CoreReduceArgs:
    """The numbers ``_core.Communicator.all_reduce_async`` takes besides the two pointers."""

    count: int
    dtype: int
    op: int
    tag: int
    quant_algorithm: int
    quant_dtype: int


def core_reduce_args(
    count: int,
    dtype: DataType,
    op: Any,
    tag: Any,
    operand_descriptor: ReduceOperandDescriptor | None,
    quantization_options: QuantizationOptions | None,
) -> CoreReduceArgs:
    """Validate one all-reduce's parameters against its buffers' ``dtype`` (ValueError/TypeError)."""
    try:
        op = ReduceOp(op)
    except ValueError:
        raise ValueError(f"op must be a ReduceOp, not {op!r}") from None
    if not isinstance(tag, int) or isinstance(tag, bool):
        raise TypeError(f"tag must be an int, not {type(tag).__name__}")
    if not 0 <= tag < _U64:
        raise ValueError(f"tag must be in [0, 2**64), not {tag}")
    if operand_descriptor is not None:
        if not isinstance(operand_descriptor, ReduceOperandDescriptor):
            raise TypeError(
                f"operand_descriptor must be a ReduceOperandDescriptor, not {type(operand_descriptor).__name__}")
        if DataType(operand_descriptor.datatype) is not dtype:
            raise ValueError(
                f"operand_descriptor.datatype is {DataType(operand_descriptor.datatype).name} "
                f"but the buffers hold {dtype.name}"
            )
    quant_algorithm, quant_dtype = QuantizationAlgorithm.NONE, dtype
    if quantization_options is not None:
        if not isinstance(quantization_options, QuantizationOptions):
            raise TypeError(
                f"quantization_options must be QuantizationOptions, not {type(quantization_options).__name__}")
        quant_algorithm = QuantizationAlgorithm(quantization_options.algorithm)
        if quant_algorithm is not QuantizationAlgorithm.NONE:
            quant_dtype = DataType(quantization_options.quantized_datatype)
    return CoreReduceArgs(count, dtype.value, op.value, tag, quant_algorithm.value, quant_dtype.value)


class ReduceOpDescriptor:
    """One piece of ``Communicator.all_reduce_multiple_with_retry``: two buffers and how to reduce them.

    Built from raw host pointers, or (better) with ``from_numpy``/``from_torch``, which validate like
    ``all_reduce`` does and keep the arrays referenced so the pointers stay valid (and CUDA tensors
    can be staged through host memory).
    """

    def __init__(self, sendbuf_ptr: int, recvbuf_ptr: int, reduce_descriptor: ReduceDescriptor) -> None:
        self.sendbuf_ptr = int(sendbuf_ptr)
        self.recvbuf_ptr = int(recvbuf_ptr)
        self.reduce_descriptor = reduce_descriptor
        self.buffers: tuple[Buffer, Buffer] | None = None  # set by from_numpy/from_torch

    def __repr__(self) -> str:
        return (f"ReduceOpDescriptor(sendbuf_ptr={self.sendbuf_ptr:#x}, recvbuf_ptr={self.recvbuf_ptr:#x}, "
                f"reduce_descriptor={self.reduce_descriptor!r})")

    @staticmethod
    def _from_pair(send: Any, recv: Any, reduce_descriptor: ReduceDescriptor) -> ReduceOpDescriptor:
        s, r = validate_pair(send, recv)
        d = reduce_descriptor
        if d.count != s.numel:
            raise ValueError(f"reduce_descriptor.count is {d.count} but the buffers hold {s.numel} elements")
        core_reduce_args(d.count, s.dtype, d.op, d.tag, d.operand_descriptor, d.quantization_options)
        desc = ReduceOpDescriptor(s.ptr, r.ptr, reduce_descriptor)
        desc.buffers = (s, r)
        return desc

    @staticmethod
    def from_numpy(send: np.ndarray, recv: np.ndarray, reduce_descriptor: ReduceDescriptor) -> ReduceOpDescriptor:
        """A piece reducing numpy array ``send`` into ``recv`` (the same array for in place)."""
        for arg, obj in (("send", send), ("recv", recv)):
            if not isinstance(obj, np.ndarray):
                raise TypeError(f"{arg} must be a numpy.ndarray, not {type(obj).__name__}")
        return ReduceOpDescriptor._from_pair(send, recv, reduce_descriptor)

    @staticmethod
    def from_torch(send: Any, recv: Any, reduce_descriptor: ReduceDescriptor) -> ReduceOpDescriptor:
        """A piece reducing torch tensor ``send`` into ``recv`` (CPU, or CUDA staged through host memory)."""
        for arg, obj in (("send", send), ("recv", recv)):
            if not is_torch_tensor(obj):
                raise TypeError(f"{arg} must be a torch.Tensor, not {type(obj).__name__}")
        return ReduceOpDescriptor._from_pair(send, recv, reduce_descriptor)


@dataclass
class TensorInfo:
    """One named tensor of a SharedState. The tensor is referenced, not copied: update it in place."""

    name: str
    data_ptr: int
    _: KW_ONLY
    numel: int
    dtype: DataType
    device_type: DeviceType
    allow_content_inequality: bool = False
    tensor: Any = field(default=None, init=False, repr=False, compare=False)  # keeps data_ptr valid

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("TensorInfo name must be a non-empty str")
        if self.numel < 0:
            raise ValueError(f"TensorInfo {self.name!r}: numel must be >= 0, not {self.numel}")
        if self.numel and not self.data_ptr:
            raise ValueError(f"TensorInfo {self.name!r}: data_ptr is null")
        self.dtype, self.device_type = DataType(self.dtype), DeviceType(self.device_type)

    @classmethod
    def _of(cls, buf: Buffer, name: str, allow_content_inequality: bool) -> TensorInfo:
        info = cls(name, buf.ptr, numel=buf.numel, dtype=buf.dtype, device_type=buf.device,
                   allow_content_inequality=allow_content_inequality)
        info.tensor = buf.obj
        return info

    @classmethod
    def from_numpy(cls, tensor: np.ndarray, name: str, *, allow_content_inequality: bool = False) -> TensorInfo:
        """Describe a C-contiguous numpy array."""
        if not isinstance(tensor, np.ndarray):
            raise TypeError(f"tensor must be a numpy.ndarray, not {type(tensor).__name__}")
        return cls._of(as_buffer(tensor, "tensor"), name, allow_content_inequality)

    @classmethod
    def from_torch(cls, tensor: Any, name: str, *, allow_content_inequality: bool = False) -> TensorInfo:
        """Describe a contiguous CPU or CUDA torch tensor."""
        if not is_torch_tensor(tensor):
            raise TypeError(f"tensor must be a torch.Tensor, not {type(tensor).__name__}")
        return cls._of(as_buffer(tensor, "tensor"), name, allow_content_inequality)


class SharedState:
    """The tensors peers keep identical, plus a revision that every sync advances by one."""

    def __init__(self, tensor_infos: list[TensorInfo]) -> None:
        infos = list(tensor_infos)
        names = [info.name for info in infos]
        if len(set(names)) != len(names):
            raise ValueError(f"SharedState tensor names must be unique, got {names}")
        self.tensor_infos = infos
        self._revision = 0

    @property
    def revision(self) -> int:
        """The revision of this state; a fresh run may start at any value."""
        return self._revision

    @revision.setter
    def revision(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"revision must be an int, not {type(value).__name__}")
        if not 0 <= value < _U64:
            raise ValueError(f"revision must be in [0, 2**64), not {value}")
        self._revision = value

    def push_revision(self) -> None:
        """Advance the revision by one (do this once per step, before syncing)."""
        self.revision = self._revision + 1

    def __repr__(self) -> str:
        return f"SharedState(revision={self._revision}, tensor_infos={self.tensor_infos!r})"
