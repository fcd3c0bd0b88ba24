"""What the fused cross-entropy's torch reference (``cross_entropy.py``) and its Triton path
(``_cross_entropy_triton.py``) share: the divisor type, the chunk sizing and the first-order guard.
A leaf, so the Triton module never imports the public one."""
from __future__ import annotations

from typing import Union

import torch

Divisor = Union[float, int, torch.Tensor, None]

_MIN_CHUNK = 64


def auto_chunk_size(n_tokens: int, vocab: int, device: torch.device, *, bytes_per_logit: int = 4,
                    max_bytes: int = 256 * 2**20) -> int:
    """Tokens per chunk so that one chunk of logits (fp32 by default) stays small next to free memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = min(max_bytes, free // 16)
    else:
        budget = min(max_bytes, 64 * 2**20)
    chunk = max(_MIN_CHUNK, budget // (vocab * bytes_per_logit))
    chunk = (chunk // _MIN_CHUNK) * _MIN_CHUNK
    return int(max(1, min(chunk, n_tokens)))


def first_order_only() -> None:
    """Raise in a fused loss's backward when it runs for ``create_graph=True`` (grad mode on)."""
    if torch.is_grad_enabled():
        raise RuntimeError("sloth_plugins fused linear cross-entropy: create_graph=True (double backward) is not "
                           "supported: its gradients are computed in the forward. Use SlothConfig(loss='off', "
                           "kernels=False, gradient_checkpointing='off') for higher-order gradients")
