"""Launch settings chosen by measurement: once per shape class, on the call's own tensors.

Only for kernels whose numbers do not depend on the choice (elementwise work: every element is
computed the same way whatever the block size), so ranks or runs that happen to pick different
settings still agree bit for bit. Off CUDA, under the interpreter, while a CUDA graph is being
captured, or with ``SLOTH_KERNEL_TUNING=0`` the first candidate is used without measuring.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Hashable, Sequence, TypeVar

import torch

from ._dispatch import interpreting

C = TypeVar("C")
_CHOSEN: Dict[Hashable, object] = {}


def row_bucket(n_rows: int) -> int:
    """Token counts change every step in padding-free training: measure per power of two only."""
    return 1 << max(n_rows - 1, 0).bit_length()


def measured_choice(key: Hashable, candidates: Sequence[C], launch: Callable[[C], None],
                    device: torch.device) -> C:
    """The fastest of ``candidates`` for ``key``; ``launch(c)`` runs the kernel with setting c
    (it may overwrite the call's output buffers: the caller launches again with the winner)."""
    chosen = _CHOSEN.get(key)
    if chosen is not None:
        return chosen  # type: ignore[return-value]
    if (len(candidates) == 1 or device.type != "cuda" or interpreting()
            or os.environ.get("SLOTH_KERNEL_TUNING", "1") == "0" or torch.cuda.is_current_stream_capturing()):
        return candidates[0]
    from triton.testing import do_bench
    times = [do_bench(lambda c=c: launch(c), warmup=2, rep=10, return_mode="median") for c in candidates]
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    _CHOSEN[key] = best
    return best


def chosen_settings() -> Dict[Hashable, object]:
    """What was measured so far (benchmarks print it)."""
    return dict(_CHOSEN)
