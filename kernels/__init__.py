"""Kernels: Triton fast paths with a pure-torch reference beside each.

Installed as ``sloth_plugins.kernels``. No transformers / peft / lightning imports here:
every function takes tensors and plain numbers. CUDA tensors take the Triton path, anything
else the reference (see ``_dispatch.use_triton``).
"""
from ._dispatch import triton_status, use_triton
from .activations import gated_activation, geglu, swiglu
from .cross_entropy import chunked_cross_entropy, fused_linear_cross_entropy
from .moe import moe_experts
from .rms_norm import rms_norm
from .rope import apply_rope

__all__ = ["apply_rope", "chunked_cross_entropy", "fused_linear_cross_entropy", "gated_activation",
           "geglu", "moe_experts", "rms_norm", "swiglu", "triton_status", "use_triton"]
