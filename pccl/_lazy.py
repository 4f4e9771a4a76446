"""Optional imports, done only when needed.

torch is optional: ``import pccl`` must not import it (it is slow and may be absent), so torch is
imported only when a torch tensor is passed or a torch conversion is asked for.
"""

from __future__ import annotations

import functools
import importlib
import sys
from types import ModuleType
from typing import Any


def require_torch(what: str) -> ModuleType:
    """Import torch for ``what``, or raise an ImportError that says torch is needed and missing."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise ImportError(f"{what} needs PyTorch, which is not installed (pip install torch)") from exc


def is_torch_tensor(obj: Any) -> bool:
    """Whether ``obj`` is a torch tensor, without importing torch.

    If torch was never imported, nobody can have made a tensor, so ``sys.modules`` answers cheaply.
    """
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


@functools.cache
def optional_ml_dtypes() -> ModuleType | None:
    """The ml_dtypes module (numpy's bfloat16) if installed; pccl does not depend on it.

    Cached: a failed import is not remembered by Python, and this runs on every dtype conversion.
    """
    try:
        return importlib.import_module("ml_dtypes")
    except ImportError:
        return None
