"""When to take a Triton path.

Triton kernels run on CUDA tensors. Everything else (CPU tensors, no Triton installed) takes
the torch reference beside each kernel. Tests drive the Triton functions on CPU under
``TRITON_INTERPRET=1`` by calling them directly, never through this dispatch.

Per-kernel override (read at every call, default ``triton``): ``SLOTH_KERNEL_<NAME>=torch``
sends that kernel to its torch reference even on CUDA, e.g. when the whole model runs under
``torch.compile`` and inductor should fuse the reference with its neighbours. Names:
``RMS_NORM``, ``ROPE``, ``GATED_ACT`` (SwiGLU and GeGLU). ``SLOTH_DISABLE_TRITON=1`` turns
every Triton path off.
"""
from __future__ import annotations

import functools
import os

import torch

KERNEL_CHOICES = ("triton", "torch")
KERNEL_NAMES = ("RMS_NORM", "ROPE", "GATED_ACT")


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


def kernel_choice(name: str) -> str:
    """``SLOTH_KERNEL_<NAME>``: 'triton' (default) or 'torch'; anything else is an error."""
    choice = os.environ.get(f"SLOTH_KERNEL_{name}", "triton").strip().lower() or "triton"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"SLOTH_KERNEL_{name}={choice!r}: expected one of "
                         f"{', '.join(KERNEL_CHOICES)}")
    return choice


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_call(*tensors: torch.Tensor) -> bool:
    """True when a kernel may skip its ``torch.library.custom_op`` and run through a plain
    ``autograd.Function``, which costs a fraction of the custom op's Python dispatch. That is
    safe only outside tracing: not under dynamo (``torch.compile``, ``torch.export``) and with
    plain tensors (FakeTensor, functional tensors and other subclasses mean some tracer or
    wrapper is at work and needs the custom op's fake implementation)."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) in _PLAIN_TENSOR_TYPES for t in tensors)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def triton_status() -> str:
    """One line for reports: why the Triton paths are or are not used on this machine."""
    if not triton_importable():
        return "Triton not importable: torch reference paths only"
    if os.environ.get("SLOTH_DISABLE_TRITON", "0") == "1":
        return "SLOTH_DISABLE_TRITON=1: torch reference paths only"
    if not torch.cuda.is_available():
        return "no CUDA device: Triton paths are GPU-only, torch reference paths in use"
    forced = [n for n in KERNEL_NAMES
              if os.environ.get(f"SLOTH_KERNEL_{n}", "").strip().lower() == "torch"]
    suffix = f" (torch reference forced for {', '.join(forced)})" if forced else ""
    return f"Triton paths active on {torch.cuda.get_device_name()}{suffix}"
