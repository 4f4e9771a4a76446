"""Enums of the public API.

The numeric values cross into the C++ core (``csrc/common/types.hpp``) and onto the wire, so they are
fixed here explicitly: never renumber a member. torch is optional and only imported by the torch
conversions; numpy is a hard dependency.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

from pccl._lazy import optional_ml_dtypes, require_torch


class Result(enum.Enum):
    """PCCL 1.0's result codes; users compare ``PCCLError.result`` against them."""

    SUCCESS = 0
    NOT_INITIALIZED = 1
    INTERNAL_ERROR = 2
    INVALID_ARGUMENT = 3
    INVALID_USAGE = 4
    TOO_FEW_PEERS = 5
    MASTER_CONNECTION_FAILED = 6
    RANK_CONNECTION_FAILED = 7
    RANK_CONNECTION_LOST = 8
    NO_SHARED_STATE_AVAILABLE = 9
    PENDING_ASYNC_OPS = 10
    UPDATE_TOPOLOGY_FAILED = 11
    TOPOLOGY_OPTIMIZATION_FAILED = 12


class ReduceOp(enum.Enum):
    """Element-wise reduction applied by an all-reduce. AVG divides the sum once, by the world size."""

    SUM = 0
    AVG = 1
    PROD = 2
    MAX = 3
    MIN = 4


class Attribute(enum.Enum):
    """What ``Communicator.get_attribute`` can report."""

    GLOBAL_WORLD_SIZE = 0  # all accepted peers, all groups
    LOCAL_WORLD_SIZE = 1  # accepted peers in my peer group
    NUM_DISTINCT_PEER_GROUPS = 2
    LARGEST_PEER_GROUP_WORLD_SIZE = 3


class SharedStateSyncStrategy(enum.Enum):
    """How a peer takes part in ``sync_shared_state``."""

    ENFORCE_POPULAR = 0  # adopt the content most peers hold
    RECEIVE_ONLY = 1  # this peer only receives
    SEND_ONLY = 2  # this peer only sends


class DeviceType(enum.Enum):
    """Where a tensor's memory lives."""

    CPU = 0
    CUDA = 1


class DistributionHint(enum.Enum):
    """A hint about the values' distribution (accepted for compatibility; informative only)."""

    NONE = 0
    NORMAL = 1
    UNIFORM = 2


class QuantizationAlgorithm(enum.Enum):
    """How values are compressed on the wire during an all-reduce."""

    NONE = 0
    MIN_MAX = 1
    ZERO_POINT_SCALE = 2


# (numpy kind, itemsize) of every numpy dtype that maps onto a DataType; bfloat16 is handled apart
# because numpy has none (ml_dtypes provides one when installed).
_NUMPY_KINDS: dict[tuple[str, int], str] = {
    ("u", 1): "UINT8", ("i", 1): "INT8", ("u", 2): "UINT16", ("i", 2): "INT16",
    ("u", 4): "UINT32", ("i", 4): "INT32", ("u", 8): "UINT64", ("i", 8): "INT64",
    ("f", 2): "FLOAT16", ("f", 4): "FLOAT", ("f", 8): "DOUBLE",
}
_ITEMSIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 8, 7: 8, 8: 2, 9: 2, 10: 4, 11: 8}
# torch attribute names; uint16/32/64 exist in torch >= 2.3 only, so they are looked up by name.
_TORCH_NAMES = {
    "UINT8": "uint8", "INT8": "int8", "UINT16": "uint16", "INT16": "int16",
    "UINT32": "uint32", "INT32": "int32", "UINT64": "uint64", "INT64": "int64",
    "FLOAT16": "float16", "BFLOAT16": "bfloat16", "FLOAT": "float32", "DOUBLE": "float64",
}


class DataType(enum.Enum):
    """Element type of a reduced or synchronised buffer."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    UINT64 = 6
    INT64 = 7
    FLOAT16 = 8
    BFLOAT16 = 9
    FLOAT = 10
    DOUBLE = 11

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return _ITEMSIZE[self.value]

    @classmethod
    def from_numpy_dtype(cls, dtype: Any) -> DataType:
        """The DataType of a numpy dtype (or anything ``np.dtype`` accepts); ValueError if unsupported."""
        if dtype is None:  # np.dtype(None) would silently mean float64
            raise ValueError("unsupported numpy dtype: None")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise ValueError(f"unsupported numpy dtype: {dtype!r}") from None
        ml_dtypes = optional_ml_dtypes()
        if ml_dtypes is not None and dt == np.dtype(ml_dtypes.bfloat16):
            return cls.BFLOAT16
        name = _NUMPY_KINDS.get((dt.kind, dt.itemsize))
        # Non-native byte order would be reduced as garbage by the core, so it is refused too.
        if name is None or not dt.isnative:
            raise ValueError(f"unsupported numpy dtype: {dt!r}")
        return cls[name]

    @classmethod
    def from_torch_dtype(cls, dtype: Any) -> DataType:
        """The DataType of a ``torch.dtype``; ValueError if unsupported (ImportError without torch)."""
        torch = require_torch("DataType.from_torch_dtype")
        for member in cls:
            if getattr(torch, _TORCH_NAMES[member.name], None) is dtype:
                return member
        raise ValueError(f"unsupported torch dtype: {dtype!r}")

    def to_torch_dtype(self) -> Any:
        """The matching ``torch.dtype`` (ImportError without torch)."""
        torch = require_torch("DataType.to_torch_dtype")
        dtype = getattr(torch, _TORCH_NAMES[self.name], None)
        if dtype is None:
            raise ValueError(f"this torch ({torch.__version__}) has no dtype for {self.name}")
        return dtype

    def to_numpy_dtype(self) -> np.dtype:
        """The matching numpy dtype; BFLOAT16 needs ml_dtypes installed (ValueError otherwise)."""
        if self is DataType.BFLOAT16:
            ml_dtypes = optional_ml_dtypes()
            if ml_dtypes is None:
                raise ValueError("numpy has no bfloat16; install ml_dtypes to use DataType.BFLOAT16 with numpy")
            return np.dtype(ml_dtypes.bfloat16)
        kind, size = next(key for key, name in _NUMPY_KINDS.items() if name == self.name)
        return np.dtype(f"{kind}{size}")


def peer_timeout_ms(seconds: float | None) -> int:
    """Seconds (None: the core's default, PCCL_PEER_TIMEOUT_MS or 10 s) as the core's milliseconds (0 = default)."""
    if seconds is None:
        return 0
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
        raise ValueError(f"peer_timeout_s must be a positive number of seconds or None, not {seconds!r}")
    return max(1, round(seconds * 1000))
