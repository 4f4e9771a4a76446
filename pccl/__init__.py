"""pccl: fault-tolerant collective communication, a drop-in for PCCL 1.0's Python API.

``import pccl`` needs numpy only. torch is imported when a torch tensor or torch conversion is used.
The compiled core (``pccl._core``) is loaded on first use of ``Communicator``, ``MasterNode`` or
``AsyncReduceHandle``: the value classes and enums work without it, and ``python -m pccl.master``
does not import the master module twice.
Set ``PCCL_LOG_LEVEL`` (TRACE, DEBUG, INFO, WARN, ERR, FATAL, NONE) before the core is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any


def _use_installed_core() -> None:
    """Python run from a source checkout (its root first on sys.path, as with ``python -m pccl.demo``
    there) imports this source tree, which has no compiled module after a regular ``pip install .``.
    The installed copy of the distribution has it: let this package find ``_core`` there too."""
    if importlib.util.find_spec("pccl._core") is not None:
        return
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        files = distribution("pccl-ring").files or []
    except PackageNotFoundError:
        return  # not installed at all: the lazy import below raises the usual ImportError
    for f in files:
        if f.parts[0] == "pccl" and f.name.startswith("_core"):
            where = str(f.locate().parent)
            if where not in __path__:
                __path__.append(where)
            return


_use_installed_core()

from pccl import cuda
from pccl._descriptors import (
    QuantizationOptions, ReduceDescriptor, ReduceInfo, ReduceOpDescriptor, ReduceOperandDescriptor,
    SharedState, SharedStateSyncInfo, TensorInfo,
)
from pccl._errors import PCCLError
from pccl._types import (
    Attribute, DataType, DeviceType, DistributionHint, QuantizationAlgorithm, ReduceOp, Result,
    SharedStateSyncStrategy,
)

if TYPE_CHECKING:
    from pccl.communicator import AsyncReduceHandle, Communicator
    from pccl.master import MasterNode

__all__ = [
    "cuda", "Communicator", "MasterNode", "ReduceOp", "Attribute", "SharedStateSyncStrategy",
    "DataType", "DistributionHint", "QuantizationAlgorithm", "ReduceOperandDescriptor", "QuantizationOptions",
    "ReduceDescriptor", "TensorInfo", "SharedState", "SharedStateSyncInfo", "ReduceInfo", "ReduceOpDescriptor",
    "AsyncReduceHandle", "PCCLError",
]

_LAZY = {"Communicator": "pccl.communicator", "AsyncReduceHandle": "pccl.communicator", "MasterNode": "pccl.master"}


def __getattr__(name: str) -> Any:
    """Load the classes that need the compiled core on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pccl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
