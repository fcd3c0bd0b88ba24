"""Gated MLP activations: SwiGLU silu(g) * u and GeGLU gelu(g) * u (erf or tanh)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_reference, use_triton
from .names import gated_activation_spec


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


def gated_activation_reference(kind: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    approximate = gated_activation_spec(kind).gelu_approximate
    if approximate is None:
        return swiglu_reference(gate, up)
    return geglu_reference(gate, up, approximate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate, up):
        from ._activations_triton import supported, swiglu_triton
        if supported(gate, up) is None and not use_reference("mlp"):
            return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"geglu approximate must be 'none' or 'tanh', got {approximate!r}")
    if use_triton(gate, up):
        from ._activations_triton import geglu_triton, supported
        if supported(gate, up) is None and not use_reference("mlp"):
            return geglu_triton(gate, up, approximate)
    return geglu_reference(gate, up, approximate)


def gated_activation(kind: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """kind is a name of ``names.GATED_ACTIVATIONS`` ('swiglu', 'geglu', 'geglu_tanh')."""
    approximate = gated_activation_spec(kind).gelu_approximate
    if approximate is None:
        return swiglu(gate, up)
    return geglu(gate, up, approximate)
