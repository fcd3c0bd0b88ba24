"""Launching a compiled Triton kernel without Triton's per-call argument binding.

``kernel[grid](*args, **meta)`` binds the arguments in Python, computes the specialization key
(dtypes, 16-byte alignment of pointers, ints equal to 1 or divisible by 16, constexprs), looks
the compiled kernel up and launches it. On an H200 host that is tens of microseconds a launch;
a QLoRA step makes ~900 of them, for kernels that mostly run for less time than that.

:func:`launch` computes the same key from the arguments with a few Python comparisons, keeps
the ``CompiledKernel`` Triton returned for it, and launches that directly. Anything it cannot
do this way (the interpreter, a Triton whose launch returns no compiled kernel) goes through
``kernel[grid](...)`` as before.
"""
from __future__ import annotations

import torch

from ._dispatch import interpreting

_compiled: dict = {}
_unsupported: set = set()
_INT32 = 2**31


def _spec(arg):
    # Everything Triton specializes a non-constexpr argument on (and a little more: harmless).
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return bool, arg
    if isinstance(arg, int):
        return int, arg == 1, arg % 16 == 0, -_INT32 <= arg < _INT32
    if arg is None:
        return None
    return type(arg)


def launch(kernel, grid: tuple, args: tuple, **meta) -> None:
    """``kernel[grid](*args, **meta)``: ``args`` are the leading (runtime) parameters, ``meta`` the
    constexpr parameters after them and the launch options (``num_warps``, ...)."""
    if kernel in _unsupported or interpreting():
        kernel[grid](*args, **meta)
        return
    device = torch.cuda.current_device()
    key = (kernel, device, len(grid), tuple(map(_spec, args)), tuple(meta.items()))
    entry = _compiled.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **meta)
        names = getattr(kernel, "arg_names", None)
        if compiled is None or not hasattr(compiled, "function") or names is None \
                or any(n not in meta for n in names[len(args):]):
            _unsupported.add(kernel)
            return
        _compiled[key] = (compiled, tuple(meta[n] for n in names[len(args):]))
        return
    compiled, constexprs = entry
    compiled[grid + (1,) * (3 - len(grid))](*args, *constexprs)


def clear_launch_cache() -> None:
    _compiled.clear()
    _unsupported.clear()
