"""Mixture-of-experts MLP: each token through its top-k experts' gated MLPs, weighted and summed.

    h_s   = x[t] W_gu[e]ᵀ                 W_gu: [E, 2I, H], rows [gate; up] (transformers' layout)
    a_s   = act(h_s[:I]) * h_s[I:]
    y_s   = a_s W_d[e]ᵀ                   W_d:  [E, H, I]
    out_t = sum_k w[t, k] * y_{(t, k)}    (summed in fp32, cast to x's dtype once)

for each pair s = (t, k) of token t and its k-th expert e = top_k_index[t, k], weight
w = top_k_weights[t, k]. This is transformers' experts module (``@use_experts_implementation``,
``has_gate``, concatenated, not transposed, no bias) in math.

The Triton path (``_moe_triton``) sorts the pairs by expert once and runs the two projections as
grouped GEMMs over the sorted rows (the first one gathering its token rows on load). Backward,
with g_s = dout[t] (gathered on load) and q_s = g_s W_d[e]:
    dw[t, k] = <a_s, q_s>,  da_s = w * q_s,  dh_s = act'-backward(da_s, h_s)
    dx[t] = sum_k dh_s W_gu[e],  dW_d[e] = sum_s (w g_s)ᵀ a_s,  dW_gu[e] = sum_s dh_sᵀ x[t]
Saved for backward: x, the routing, h (2I per pair). ``a`` is rebuilt from h in backward.

LoRA on a stack (``ExpertLora``: ``W[e] + s·B[e]·A[e]``) runs as two rank-r grouped GEMMs beside the
base one (``h += s·(x A[e]ᵀ) B[e]ᵀ``), and its backward as rank-r grouped GEMMs and weight
gradients of A and B only: ``W + s·B·A`` is never formed, and a frozen W gets no gradient.

The reference below loops over the experts in Python; it is the definition the Triton path is
tested against (and what runs off CUDA), not a fast path.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._dispatch import use_triton
from .activations import gated_activation_reference
from .names import gated_activation_spec

BLOCK_M = 64   # sorted rows per tile of the grouped GEMMs (16 in the interpreter tests)


class ExpertLora(NamedTuple):
    """LoRA on a stack of expert weights ``W [E, out, in]``: ``W[e] + scale * B[e] @ A[e]`` with
    ``A [E, r, in]`` and ``B [E, out, r]`` (any strides), in the weights' dtype."""
    A: torch.Tensor
    B: torch.Tensor
    scale: float


def _with_lora(weight: torch.Tensor, lora: Optional[ExpertLora]) -> torch.Tensor:
    if lora is None:
        return weight
    return weight + lora.scale * torch.bmm(lora.B.to(weight.dtype), lora.A.to(weight.dtype))


def moe_experts_reference(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                          gate_up_proj: torch.Tensor, down_proj: torch.Tensor, kind: str,
                          lora_gate_up: Optional[ExpertLora] = None,
                          lora_down: Optional[ExpertLora] = None) -> torch.Tensor:
    """x [T, H], top_k_index / top_k_weights [T, k], gate_up_proj [E, 2I, H], down_proj [E, H, I];
    optional LoRA on either stack (the reference forms ``W + s·B·A``; the Triton path never does)."""
    gated_activation_spec(kind)
    gate_up_proj, down_proj = _with_lora(gate_up_proj, lora_gate_up), _with_lora(down_proj, lora_down)
    tokens, top_k = top_k_index.shape
    num_experts, inter = gate_up_proj.shape[0], down_proj.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts].tolist()
    xs = x[order // top_k].to(gate_up_proj.dtype)
    ys = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            h = xs[start:start + n] @ gate_up_proj[e].t()
            a = gated_activation_reference(kind, h[:, :inter], h[:, inter:])
            ys.append(a @ down_proj[e].t())
        start += n
    y = torch.cat(ys) if ys else xs.new_zeros(0, x.shape[-1])
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    weighted = unsorted.float().view(tokens, top_k, -1) * top_k_weights.float().unsqueeze(-1)
    return weighted.sum(1).to(x.dtype)


def supported_weights(weight: torch.Tensor) -> Optional[str]:
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return f"expert weights are {weight.dtype} (the Triton path takes bf16 / fp16)"
    return None


def supported(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
              gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> Optional[str]:
    """Why the Triton path cannot take these tensors (None when it can)."""
    if x.dim() != 2 or top_k_index.dim() != 2 or top_k_weights.shape != top_k_index.shape:
        return "x must be [tokens, hidden] and the routing [tokens, k]"
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        return "expert weights must be 3-D"
    e, two_i, h = gate_up_proj.shape
    if down_proj.shape != (e, h, two_i // 2) or two_i % 2 or x.shape[-1] != h:
        return f"expert weight shapes {tuple(gate_up_proj.shape)} / {tuple(down_proj.shape)} do not match"
    if gate_up_proj.dtype != down_proj.dtype:
        return f"expert weights of two dtypes ({gate_up_proj.dtype}, {down_proj.dtype})"
    why = supported_weights(gate_up_proj)
    if why is not None:
        return why
    if not x.is_floating_point() or top_k_index.dtype not in (torch.int64, torch.int32):
        return "x must be floating point and top_k_index an integer tensor"
    return None


def moe_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, kind: str,
                lora_gate_up: Optional[ExpertLora] = None, lora_down: Optional[ExpertLora] = None) -> torch.Tensor:
    """The experts' output [T, H]: Triton grouped GEMMs on CUDA (bf16 / fp16 weights), else the reference."""
    if use_triton(x, gate_up_proj, down_proj) and supported(x, top_k_index, top_k_weights, gate_up_proj,
                                                            down_proj) is None:
        return moe_experts_triton(x, top_k_index, top_k_weights, gate_up_proj, down_proj, kind,
                                  lora_gate_up=lora_gate_up, lora_down=lora_down)
    return moe_experts_reference(x, top_k_index, top_k_weights, gate_up_proj, down_proj, kind, lora_gate_up,
                                 lora_down)


def moe_experts_triton(x, top_k_index, top_k_weights, gate_up_proj, down_proj, kind: str,
                       block_m: int = BLOCK_M, lora_gate_up: Optional[ExpertLora] = None,
                       lora_down: Optional[ExpertLora] = None) -> torch.Tensor:
    """The Triton path; LoRA factors are cast to the weights' dtype (differentiably: their gradients come
    back in their own dtype) and applied as rank-r grouped GEMMs beside the base ones, never as W + s·B·A."""
    gated_activation_spec(kind)
    dtype = gate_up_proj.dtype
    lg, ld = (None if lo is None else ExpertLora(lo.A.to(dtype), lo.B.to(dtype), float(lo.scale))
              for lo in (lora_gate_up, lora_down))
    with torch.autocast(x.device.type, enabled=False):
        return _MoeExpertsFn.apply(x, top_k_index, top_k_weights, gate_up_proj, down_proj, kind, block_m,
                                   lg is not None and lg.scale, ld is not None and ld.scale,
                                   *(lg[:2] if lg is not None else (None, None)),
                                   *(ld[:2] if ld is not None else (None, None)))


def _activation_forward(h: torch.Tensor, inter: int, kind: str) -> torch.Tensor:
    from ._activations_triton import _forward
    return _forward(h[:, :inter], h[:, inter:], gated_activation_spec(kind).act)


class _MoeExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, w_gu, w_d, kind, block_m, s_gu, s_d, a_gu, b_gu, a_d, b_d):
        from ._moe_triton import Routing, grouped_mm
        tokens, top_k = top_k_index.shape
        inter = w_d.shape[-1]
        routing = Routing(top_k_index, w_gu.shape[0], block_m)
        x = x.contiguous()
        h = grouped_mm(x, w_gu, routing, gather=True)                   # [S, 2I]
        xa = au = None
        if a_gu is not None:                                            # + s (x A[e]ᵀ) B[e]ᵀ
            xa = grouped_mm(x, a_gu, routing, gather=True)              # [S, r]
            h += s_gu * grouped_mm(xa, b_gu, routing)
        a = _activation_forward(h, inter, kind)                         # [S, I]
        y = grouped_mm(a, w_d, routing)                                 # [S, H]
        if a_d is not None:
            au = grouped_mm(a, a_d, routing)                            # [S, r]
            y += s_d * grouped_mm(au, b_d, routing)
        del a
        inverse = routing.unsort()
        weighted = y[inverse].float().view(tokens, top_k, -1) * top_k_weights.float().unsqueeze(-1)
        out = weighted.sum(1).to(x.dtype)
        ctx.save_for_backward(x, top_k_weights, w_gu, w_d, h, inverse, a_gu, b_gu, a_d, b_d, xa, au)
        ctx.routing, ctx.kind, ctx.scales = routing, kind, (s_gu, s_d)
        return out

    @staticmethod
    def backward(ctx, dout):
        from ._lora_triton import gated_activation_backward_triton_
        from ._moe_triton import grouped_mm, grouped_wgrad
        x, top_k_weights, w_gu, w_d, h, inverse, a_gu, b_gu, a_d, b_d, xa, au = ctx.saved_tensors
        routing, kind, (s_gu, s_d) = ctx.routing, ctx.kind, ctx.scales
        needs = ctx.needs_input_grad
        tokens, top_k = top_k_weights.shape
        inter = w_d.shape[-1]
        dtype = w_gu.dtype
        dout = dout.contiguous()
        w_sorted = top_k_weights.reshape(-1)[routing.order].float()
        q = grouped_mm(dout, w_d, routing, transpose=False, gather=True)          # [S, I] = g_s W_d[e]
        gb = None
        if a_d is not None:                                                        # + s g_s B_d[e] A_d[e]
            gb = grouped_mm(dout, b_d, routing, transpose=False, gather=True)     # [S, r]
            q += s_d * grouped_mm(gb, a_d, routing, transpose=False)
        da = (q.float() * w_sorted[:, None]).to(dtype)
        dh = h.clone()
        gated_activation_backward_triton_(dh[:, :inter], dh[:, inter:], da, kind)  # da <- a, dh <- (dg, du)
        a = da
        g = {}
        if needs[2]:
            dw_sorted = (a.float() * q.float()).sum(-1)
            g["weights"] = dw_sorted[inverse].view(tokens, top_k).to(top_k_weights.dtype)
        del q
        if needs[4]:
            g["w_d"] = grouped_wgrad(dout, a, routing, dtype, gather_a=True, scale=w_sorted)     # [E, H, I]
        if a_d is not None:
            if needs[12]:
                g["b_d"] = grouped_wgrad(dout, au, routing, dtype, gather_a=True, scale=w_sorted * s_d)  # [E, H, r]
            if needs[11]:
                du = (gb.float() * (w_sorted * s_d)[:, None]).to(dtype)
                g["a_d"] = grouped_wgrad(du, a, routing, dtype)                  # [E, r, I]
        del a, da
        dxa = None
        if a_gu is not None:
            dxa = (grouped_mm(dh, b_gu, routing, transpose=False, out_dtype=torch.float32) * s_gu).to(dtype)
            if needs[10]:
                g["b_gu"] = grouped_wgrad(dh, xa, routing, dtype, scale=torch.full_like(w_sorted, s_gu))
            if needs[9]:
                g["a_gu"] = grouped_wgrad(dxa, x, routing, dtype, gather_b=True)   # [E, r, H]
        if needs[0]:
            dxs = grouped_mm(dh, w_gu, routing, transpose=False)                   # [S, H]
            if dxa is not None:
                dxs += grouped_mm(dxa, a_gu, routing, transpose=False)
            g["x"] = dxs[inverse].float().view(tokens, top_k, -1).sum(1).to(x.dtype)
            del dxs
        if needs[3]:
            g["w_gu"] = grouped_wgrad(dh, x, routing, dtype, gather_b=True)          # [E, 2I, H]
        return (g.get("x"), None, g.get("weights"), g.get("w_gu"), g.get("w_d"), None, None, None, None,
                g.get("a_gu"), g.get("b_gu"), g.get("a_d"), g.get("b_d"))
