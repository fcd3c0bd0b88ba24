"""When to take a Triton path.

Triton kernels run on CUDA tensors. Everything else (CPU tensors, no Triton installed) takes
the torch reference beside each kernel. Tests drive the Triton functions on CPU under
``TRITON_INTERPRET=1`` by calling them directly, never through this dispatch.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor lives on a CUDA device and Triton can compile for it."""
    if os.environ.get("SLOTH_DISABLE_TRITON", "0") == "1" or not triton_importable():
        return False
    return all(t.is_cuda for t in tensors)


def triton_status() -> str:
    """One line for reports: why the Triton paths are or are not used on this machine."""
    if not triton_importable():
        return "Triton not importable: torch reference paths only"
    if os.environ.get("SLOTH_DISABLE_TRITON", "0") == "1":
        return "SLOTH_DISABLE_TRITON=1: torch reference paths only"
    if not torch.cuda.is_available():
        return "no CUDA device: Triton paths are GPU-only, torch reference paths in use"
    return f"Triton paths active on {torch.cuda.get_device_name()}"
