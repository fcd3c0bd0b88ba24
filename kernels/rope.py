"""Rotary position embedding applied to q and k together (rotate-half convention).

``cos``/``sin`` come from the model's rotary module, one row per position, so packed rows
whose positions restart at 0 are handled by whoever built them. When ``cos`` is narrower
than the head (partial rotary, e.g. Phi-3 variants) only the leading ``cos.shape[-1]``
channels rotate and the rest pass through.
"""
from __future__ import annotations

import torch

from ._dispatch import use_reference, use_triton


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return (x * cos) + (_rotate_half(x) * sin)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat(((x_rot * cos) + (_rotate_half(x_rot) * sin), x_pass), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return _rope_one(q, cos, sin), _rope_one(k, cos, sin)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Hq, S, D], k: [B, Hk, S, D] (unsqueeze_dim=1); cos/sin: [B, S, Drot]."""
    if use_triton(q, k, cos, sin):
        from ._rope_triton import apply_rope_triton, supported
        if supported(q, k, cos, sin, unsqueeze_dim) is None and not use_reference("rope"):
            return apply_rope_triton(q, k, cos, sin, unsqueeze_dim)
    return apply_rope_reference(q, k, cos, sin, unsqueeze_dim)
