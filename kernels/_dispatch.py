"""When to take a Triton path.

Triton kernels run on CUDA tensors. Everything else (CPU tensors, no Triton installed) takes
the torch reference beside each kernel. Each public module (``rms_norm.py``, ``rope.py``, ...)
makes the choice in one place: ``use_triton`` (device), its ``_x_triton.supported`` (shapes,
dtypes), then ``use_reference`` (the switch below). Tests drive the Triton functions on CPU under
``TRITON_INTERPRET=1`` by calling them directly, or force ``use_triton`` in the public module.

Per-kernel switch (read at every call), named after the kernel's ``SlothConfig`` name
(``names.SWITCHED_KERNELS``): ``SLOTH_KERNEL_RMS_NORM``, ``SLOTH_KERNEL_ROPE``,
``SLOTH_KERNEL_MLP`` (SwiGLU and GeGLU; ``SLOTH_KERNEL_GATED_ACT`` is its deprecated old name)
= ``auto`` (default), ``triton`` or ``torch``. ``torch`` sends that kernel to its torch reference
even on CUDA; ``triton`` takes the Triton kernel wherever it can, also inside ``torch.compile``
(as a custom op). ``auto`` does the same, except that inside a graph ``torch.compile`` is tracing
it hands the kernels listed in ``COMPILED_REFERENCE_WINS`` their reference, for inductor to
generate and fuse: there, benchmarks/kernels.py measured inductor's code at least as fast as
ours. ``SLOTH_DISABLE_TRITON=1`` turns every Triton path off.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from .names import DEPRECATED_ENV_VARS, SWITCHED_KERNELS, kernel_env_var

KERNEL_CHOICES = ("auto", "triton", "torch")
# H200, Llama-3-8B shapes, forward+backward (benchmarks/RESULTS.md section 1): torch.compile of the
# reference 0.440 ms vs ours 0.445 (SwiGLU) and 0.439 vs 0.455 (tanh GeGLU); ours wins for RMSNorm
# (0.375 vs 0.436) and RoPE (0.497 vs 0.573), so those keep the Triton kernel under compile too.
COMPILED_REFERENCE_WINS = frozenset({"mlp"})
_ENV_VARS = {name: kernel_env_var(name) for name in SWITCHED_KERNELS}
_warned_deprecated: set = set()


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


def _switch(name: str):
    """(variable, value) of kernel ``name``'s switch; value None when unset. Falls back to the
    deprecated variable (one DeprecationWarning per process) when only that one is set."""
    var = _ENV_VARS[name]
    value = os.environ.get(var)
    if value is None:
        old = DEPRECATED_ENV_VARS.get(name)
        if old is not None and old in os.environ:
            if old not in _warned_deprecated:
                _warned_deprecated.add(old)
                warnings.warn(f"{old} is deprecated; set {var} instead", DeprecationWarning, stacklevel=4)
            return old, os.environ[old]
    return var, value


def kernel_choice(name: str) -> str:
    """``SLOTH_KERNEL_<NAME>`` of kernel ``name`` (a ``names.SWITCHED_KERNELS`` name):
    'auto' (default), 'triton' or 'torch'; anything else is an error."""
    var, value = _switch(name)
    choice = (value or "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{var}={choice!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    return choice


def use_reference(name: str) -> bool:
    """True when kernel ``name`` should run its torch reference instead of Triton (see above)."""
    choice = kernel_choice(name)
    if choice == "auto":
        return name in COMPILED_REFERENCE_WINS and torch.compiler.is_compiling()
    return choice == "torch"


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
    forced = [n for n in SWITCHED_KERNELS if kernel_choice(n) == "torch"]
    suffix = f" (torch reference forced for {', '.join(forced)})" if forced else ""
    return f"Triton paths active on {torch.cuda.get_device_name()}{suffix}"
