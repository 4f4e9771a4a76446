"""CUDA support: CUDA tensors are accepted and staged through pinned host memory by the Python layer."""

from __future__ import annotations

import importlib


def is_available() -> bool:
    """Whether CUDA tensors can be used: torch is installed and sees a CUDA device."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
