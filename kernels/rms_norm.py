"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w).

Two flavours exist in the wild and they round differently in half precision:
  * Llama-style (``cast_before_weight=True``): normalise in fp32, cast to the input dtype,
    then multiply by the weight.
  * Gemma-style (``cast_before_weight=False``, usually ``offset=1``): multiply by (1 + w) in
    fp32, cast last.
The reference reproduces each exactly; the Triton path computes in fp32 and rounds where the reference does.
"""
from __future__ import annotations

import torch

from ._dispatch import use_reference, use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       cast_before_weight: bool = True) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        w = weight if offset == 0.0 else offset + weight
        return w * h.to(dtype)
    return (h * (offset + weight.float())).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             cast_before_weight: bool = True) -> torch.Tensor:
    if use_triton(x, weight):
        from ._rms_norm_triton import rms_norm_triton, supported
        if supported(x, weight) is None and not use_reference("rms_norm"):
            return rms_norm_triton(x, weight, eps, offset, cast_before_weight)
    return rms_norm_reference(x, weight, eps, offset, cast_before_weight)
