"""In-place backward of the gated activation for the fused LoRA MLP.

Reads gate g, up u and the incoming gradient da of a = act(g) * u, and overwrites all three:
da <- a (the down projection's LoRA gradient needs it), g <- dg, u <- du. No new [tokens x
intermediate] tensor is allocated. The math is ``_act_and_grad`` of the activation kernels, so
the recomputed ``a`` rounds exactly as the forward's (act rounded to the input dtype first).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._activations_triton import _act_and_grad
from .names import GATED_ACTIVATIONS

KIND_IDS = {name: spec.kind_id for name, spec in GATED_ACTIVATIONS.items()}
_BLOCK_MAX = 2048


@triton.jit
def _gated_bwd_inplace_kernel(g_ptr, u_ptr, da_ptr, n_cols, sg, su, sda,
                              KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g_raw = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0)
    g = g_raw.to(tl.float32)
    u = tl.load(u_ptr + row * su + cols, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + row * sda + cols, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, KIND)
    act = act.to(g_raw.dtype).to(tl.float32)
    tl.store(da_ptr + row * sda + cols, (act * u).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + row * sg + cols, (da * u * dact).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + row * su + cols, (da * act).to(u_ptr.dtype.element_ty), mask=mask)


def gated_activation_backward_triton_(g: torch.Tensor, u: torch.Tensor, da: torch.Tensor, kind: str) -> torch.Tensor:
    """2-D g, u, da of one shape with unit column stride; returns da (now holding a)."""
    if not (g.shape == u.shape == da.shape and g.dim() == 2):
        raise ValueError("gate, up and grad must be 2-D tensors of one shape")
    if g.stride(1) != 1 or u.stride(1) != 1 or da.stride(1) != 1:
        raise ValueError("gate, up and grad need unit column stride")
    n_rows, n_cols = g.shape
    if g.numel() == 0:
        return da
    block = min(triton.next_power_of_2(n_cols), _BLOCK_MAX)
    grid = (n_rows, triton.cdiv(n_cols, block))
    _gated_bwd_inplace_kernel[grid](g, u, da, n_cols, g.stride(0), u.stride(0), da.stride(0),
                                    KIND=KIND_IDS[kind], BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return da
