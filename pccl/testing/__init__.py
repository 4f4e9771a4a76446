"""Test and benchmark helpers that need no part of pccl: a WAN emulator between network namespaces.

Names are imported on first use, so ``python -m pccl.testing.wan`` does not find its own module
already imported by this package.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LinkSpec": "pccl.testing.link_spec",
    "WanEmulator": "pccl.testing.wan",
    "delay_line_path": "pccl.testing.wan",
    "emulator_available": "pccl.testing.wan",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pccl.testing' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
