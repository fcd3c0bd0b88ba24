"""Fused LoRA projections: ``y = x Wᵀ (+ b) + s·(x Aᵀ) Bᵀ``, never forming ``W + s·B A``.

The base weight is frozen: dense ``[out, in]``, or bitsandbytes 4-bit bytes plus a
:class:`~.nf4.QuantState4bit`, dequantized into a shared scratch buffer right before each
matmul (forward and again in backward; the dequantized weight is never saved).

Dtypes follow PEFT's ``lora.Linear`` without autocast: the base matmul runs in the dtype of
``x`` (the compute dtype ``cd``); the LoRA branch in the dtype of ``A`` (``ld``, often fp32
while ``x`` is bf16) on ``x.to(ld)``; the sum is taken in the promoted dtype and cast back to
``cd``. When ``ld == cd`` (the fast path) the LoRA term is added in place with ``addmm_``.
``lora_dtype`` sets ``ld`` (autocast: fp32 adapters run in bf16): A and B are cast inside the
autograd functions, and their gradients come back in their own dtype. Autocast is switched off
inside: callers (the PEFT glue) pick the dtypes and cast ``x`` before calling.

Saved for backward: x. The rank-r products ``h = x Aᵀ`` (tokens x r, ~1% of x) and the A, B
and bias parameters are kept on the context: saved tensors pass through saved-tensor hooks, a
Python cost per tensor under checkpointing, and h is too small to be worth dropping there
(llama-8b, 4096 tokens: 28 MB over all 32 layers). The gated MLP also
saves its gate and up projections (2·tokens·intermediate): recomputing them instead would add
two of the six big matmuls of the MLP's forward+backward (~+33% MLP time) to save memory that,
under gradient checkpointing, lives only during that one layer's backward. The activation
output ``a`` is not saved: the backward rebuilds it in place of its own gradient, and writes
the gate/up gradients over the saved gate/up (so calling backward twice raises PyTorch's
"modified by an inplace operation" error instead of returning wrong numbers).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._dispatch import use_triton
from .activations import gated_activation, gated_activation_reference
from .names import GATED_ACTIVATION_NAMES, gated_activation_spec
from .nf4 import QuantState4bit, dequantize_4bit, dequantize_4bit_reference

ACTIVATIONS = GATED_ACTIVATION_NAMES


@dataclass(frozen=True)
class LoraProjection:
    """One linear layer: frozen base weight (+ bias) and an optional LoRA pair.

    ``weight`` is dense ``[out, in]``, or the packed 4-bit bytes when ``quant`` is set.
    ``A`` is ``[r, in]``, ``B`` is ``[out, r]``; both None for a plain frozen projection.
    """
    weight: torch.Tensor
    A: Optional[torch.Tensor] = None
    B: Optional[torch.Tensor] = None
    scale: float = 1.0
    bias: Optional[torch.Tensor] = None
    quant: Optional[QuantState4bit] = None

    @property
    def has_lora(self) -> bool:
        return self.A is not None

    @property
    def out_features(self) -> int:
        return self.quant.shape[0] if self.quant is not None else self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.quant.shape[1] if self.quant is not None else self.weight.shape[1]


ProjectionLike = Union[LoraProjection, Sequence]


def as_projection(p: ProjectionLike) -> LoraProjection:
    """A LoraProjection, or a tuple ``(weight, A, B, scale[, bias[, quant]])``."""
    if isinstance(p, LoraProjection):
        proj = p
    else:
        proj = LoraProjection(*p)
    if (proj.A is None) != (proj.B is None):
        raise ValueError("LoRA A and B must both be given or both be None")
    if proj.has_lora and proj.A.dtype != proj.B.dtype:
        raise ValueError(f"LoRA A ({proj.A.dtype}) and B ({proj.B.dtype}) must share a dtype")
    return proj


# ----------------------------------------------------------------------------- building blocks
# All take 2-D tensors, run without autograd, and are shared by the three Functions.

def _base_weight(p: LoraProjection, cd: torch.dtype, slot: tuple) -> torch.Tensor:
    """The base weight in the compute dtype. A 4-bit weight is dequantized into the scratch
    buffer of its ``slot`` (its role in the layer, e.g. the second of three fused projections):
    one buffer per role, so a layer's backward right after its forward (or its checkpoint
    recompute) finds its weights still dequantized and skips the kernel."""
    if p.quant is not None:
        return dequantize_4bit(p.weight, p.quant, cd, reuse_buffer=True, slot=slot)
    return p.weight if p.weight.dtype == cd else p.weight.to(cd)


def _lora_dtype(projs: Sequence[LoraProjection], cd: torch.dtype) -> torch.dtype:
    dtypes = {p.A.dtype for p in projs if p.has_lora}
    if len(dtypes) > 1:
        raise ValueError(f"projections fused together need one LoRA dtype, got {sorted(map(str, dtypes))}")
    return dtypes.pop() if dtypes else cd


def _lora_down(xl: torch.Tensor, projs: Sequence[LoraProjection]) -> list:
    """h_i = xl A_iᵀ for each LoRA projection. One matmul each, not one over the concatenated
    A's: the concatenation is a launch of its own, and the rounding then matches PEFT's."""
    return [torch.mm(xl, p.A.t()) if p.has_lora else None for p in projs]


def _project(x: torch.Tensor, h: Optional[torch.Tensor], p: LoraProjection, cd, ld, slot) -> torch.Tensor:
    W = _base_weight(p, cd, slot)
    y = torch.mm(x, W.t()) if p.bias is None else torch.addmm(p.bias.to(cd), x, W.t())
    if h is None:
        return y
    if ld == cd:
        return y.addmm_(h, p.B.t(), alpha=p.scale)
    pd = torch.promote_types(cd, ld)
    return (y.to(pd) + torch.mm(h, p.B.t()).mul_(p.scale).to(pd)).to(cd)


def _forward_projections(x: torch.Tensor, projs: Sequence[LoraProjection], cd, ld, role: str):
    xl = x if ld == cd else x.to(ld)
    hs = _lora_down(xl, projs)
    return [_project(x, h, p, cd, ld, (role, i, len(projs))) for i, (h, p) in enumerate(zip(hs, projs))], hs


def _lora_grads(dy, h, xl, p: LoraProjection, ld, need_dA: bool, need_dB: bool):
    """(dh, dA, dB) of the LoRA branch s·(h Bᵀ), h = xl Aᵀ, for upstream gradient dy."""
    dyl = dy if dy.dtype == ld else dy.to(ld)
    dB = torch.mm(dyl.t(), h).mul_(p.scale) if need_dB else None
    dh = torch.mm(dyl, p.B).mul_(p.scale)
    dA = torch.mm(dh.t(), xl) if need_dA else None
    return dh, dA, dB


def _add_lora_input_grad(dx: torch.Tensor, dh: torch.Tensor, A: torch.Tensor, cd, ld) -> torch.Tensor:
    """dx += dh A (the LoRA branch's input gradient)."""
    if ld == cd:
        return dx.addmm_(dh, A)
    return dx.add_(torch.mm(dh, A).to(cd))


def _backward_projections(dys, x, hs, projs, cd, ld, need_dx: bool, need_params: list, role: str):
    """Gradients of projections sharing input x: dx (or None) and (dA, dB, dbias) per projection.
    dx sums each projection's base and LoRA terms in turn, the order of PEFT's modules."""
    xl = None
    dx, grads = None, []
    for i, (dy, h, p, (need_dA, need_dB, need_db)) in enumerate(zip(dys, hs, projs, need_params)):
        dA = dB = db = dh = None
        if p.has_lora and (need_dx or need_dA or need_dB):
            if need_dA and xl is None:
                xl = x if ld == cd else x.to(ld)
            dh, dA, dB = _lora_grads(dy, h, xl, p, ld, need_dA, need_dB)
        if need_db:
            db = dy.sum(0).to(p.bias.dtype)
        grads.append((dA, dB, db))
        if need_dx:
            W = _base_weight(p, cd, (role, i, len(projs)))
            dx = torch.mm(dy, W) if dx is None else dx.addmm_(dy, W)
            if dh is not None:
                dx = _add_lora_input_grad(dx, dh, p.A, cd, ld)
    return dx, grads


def _flat_params(projs: Sequence[LoraProjection]) -> list:
    return [t for p in projs for t in (p.A, p.B, p.bias)]


def _in_lora_dtype(projs: Sequence[LoraProjection], ld: torch.dtype) -> list:
    """The projections with A and B in the LoRA compute dtype. Cast inside the Functions' forward
    (autograd records no cast nodes) and kept for their backward, which returns dA, dB in A's dtype."""
    return [p if not p.has_lora or p.A.dtype == ld else
            LoraProjection(p.weight, p.A.to(ld), p.B.to(ld), p.scale, p.bias, p.quant) for p in projs]


def _param_needs(ctx, first: int, count: int) -> list:
    n = ctx.needs_input_grad
    return [(n[first + 3 * i], n[first + 3 * i + 1], n[first + 3 * i + 2]) for i in range(count)]


def _save(ctx, x, projs, cast_projs, dtypes, hs, *extra) -> None:
    """x and ``extra`` through save_for_backward (checkpointing drops and recomputes them). The
    parameters, their casts to the LoRA dtype (the backward, right after a checkpoint's
    recompute, needs them again) and the rank-r products ``hs`` (tokens x r: ~1% of x) are kept
    on ctx: under torch's checkpoint every saved tensor costs a pair of saved-tensor hooks."""
    ctx.projs, ctx.cast_projs, ctx.dtypes, ctx.hs = projs, cast_projs, dtypes, hs
    ctx.save_for_backward(x, *extra)


def _load(ctx):
    """(x, projections with A/B in the LoRA compute dtype, hs, the extra saved tensors)."""
    saved = ctx.saved_tensors
    return saved[0], ctx.cast_projs, ctx.hs, saved[1:]


_NOTHING = contextlib.nullcontext()


def _no_autocast(x: torch.Tensor):
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return _NOTHING        # backward (the engine's threads) and plain forwards: nothing to switch off


def _grad_tuple(grads, projs: Sequence[LoraProjection]) -> list:
    """dA, dB, dbias per projection, in the dtypes of the parameters."""
    out = []
    for (dA, dB, db), p in zip(grads, projs):
        if dA is not None and dA.dtype != p.A.dtype:
            dA = dA.to(p.A.dtype)
        if dB is not None and dB.dtype != p.B.dtype:
            dB = dB.to(p.B.dtype)
        out += [dA, dB, db]
    return out


# ----------------------------------------------------------------------------- Functions

class _LoraProjectionsFn(torch.autograd.Function):
    """Several projections of one input: shared saved x, one dx accumulator."""

    @staticmethod
    def forward(ctx, x, projs, lora_dtype, *params):   # params: the A, B, bias of projs, listed for autograd
        cd = x.dtype
        ld = lora_dtype or _lora_dtype(projs, cd)
        lp = _in_lora_dtype(projs, ld)
        with _no_autocast(x):
            outs, hs = _forward_projections(x, lp, cd, ld, "proj")
        _save(ctx, x, projs, lp, (cd, ld), hs)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x, projs, hs, _ = _load(ctx)
        cd, ld = ctx.dtypes
        with _no_autocast(x):
            dx, grads = _backward_projections(dys, x, hs, projs, cd, ld, ctx.needs_input_grad[0],
                                              _param_needs(ctx, 3, len(projs)), "proj")
        return (dx, None, None, *_grad_tuple(grads, ctx.projs))


def gated_activation_backward_reference(g, u, da, kind: str):
    """(a, dg, du) for a = act(g)·u, in fp32 math, act(g) rounded to g's dtype as in forward."""
    dtype = g.dtype
    ct = torch.promote_types(dtype, torch.float32)
    gf, uf, daf = g.to(ct), u.to(ct), da.to(ct)
    act_name = gated_activation_spec(kind).act
    if act_name == "silu":
        sig = torch.sigmoid(gf)
        act, dact = gf * sig, sig * (1 + gf * (1 - sig))
    elif act_name == "gelu":
        cdf = 0.5 * (1 + torch.erf(gf * 0.7071067811865476))
        act, dact = gf * cdf, cdf + gf * torch.exp(-0.5 * gf * gf) * 0.3989422804014327
    else:  # gelu_tanh
        c = 0.7978845608028654
        t = torch.tanh(c * (gf + 0.044715 * gf ** 3))
        act = 0.5 * gf * (1 + t)
        dact = 0.5 * (1 + t) + 0.5 * gf * (1 - t * t) * c * (1 + 3 * 0.044715 * gf * gf)
    act = act.to(dtype).to(ct)
    return (act * uf).to(da.dtype), (daf * uf * dact).to(dtype), (daf * act).to(u.dtype)


def gated_activation_backward_(g, u, da, kind: str) -> torch.Tensor:
    """In place: da <- a, g <- dg, u <- du (2-D, unit column stride). Returns da."""
    if use_triton(g, u, da):
        from ._lora_triton import gated_activation_backward_triton_
        gated_activation_backward_triton_(g, u, da, kind)
        for t in (g, u, da):  # a raw-pointer write: tell autograd these tensors changed
            torch.autograd.graph.increment_version(t)
        return da
    a, dg, du = gated_activation_backward_reference(g, u, da, kind)
    da.copy_(a)
    g.copy_(dg)
    u.copy_(du)
    return da


def _split_gate_up(outs):
    if len(outs) == 2:
        return outs[0], outs[1]
    return outs[0].chunk(2, dim=-1)


class _LoraGatedMLPFn(torch.autograd.Function):
    """down(act(gate(x)) * up(x)); gate/up given as two projections or one fused gate_up."""

    @staticmethod
    def forward(ctx, x, projs, activation, lora_dtype, *params):
        cd = x.dtype
        ld = lora_dtype or _lora_dtype(projs, cd)
        lp = _in_lora_dtype(projs, ld)
        up_projs, down = lp[:-1], lp[-1]
        with _no_autocast(x):
            outs, hs = _forward_projections(x, up_projs, cd, ld, "mlp_in")
            g, u = _split_gate_up(outs)
            a = gated_activation(activation, g, u)
            (y,), (h_down,) = _forward_projections(a, [down], cd, ld, "mlp_out")
        _save(ctx, x, projs, lp, (cd, ld), [*hs, h_down], *outs)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, projs, hs, outs = _load(ctx)
        up_projs, down = projs[:-1], projs[-1]
        hs, h_down, outs = hs[:-1], hs[-1], list(outs)
        cd, ld = ctx.dtypes
        needs = _param_needs(ctx, 4, len(projs))
        need_dA_down, need_dB_down, need_db_down = needs[-1]
        with _no_autocast(x):
            da = torch.mm(dy, _base_weight(down, cd, ("mlp_out", 0, 1)))
            dA_down = dB_down = db_down = dh_down = None
            if down.has_lora:
                dh_down, _, dB_down = _lora_grads(dy, h_down, None, down, ld, False, need_dB_down)
                da = _add_lora_input_grad(da, dh_down, down.A, cd, ld)
            if need_db_down:
                db_down = dy.sum(0).to(down.bias.dtype)
            g, u = _split_gate_up(outs)
            a = gated_activation_backward_(g, u, da, ctx.activation)  # outs now hold dg, du
            if need_dA_down:
                dA_down = torch.mm(dh_down.t(), a if ld == cd else a.to(ld))
            dx, grads = _backward_projections(outs, x, hs, up_projs, cd, ld, ctx.needs_input_grad[0],
                                              needs[:-1], "mlp_in")
        grads.append((dA_down, dB_down, db_down))
        return (dx, None, None, None, *_grad_tuple(grads, ctx.projs))


# ----------------------------------------------------------------------------- public API

def _check_input(x: torch.Tensor, projs: Sequence[LoraProjection]) -> None:
    for p in projs:
        if p.in_features != x.shape[-1]:
            raise ValueError(f"input has {x.shape[-1]} features, projection expects {p.in_features}")


def lora_projections(x: torch.Tensor, projs: Sequence[ProjectionLike],
                     lora_dtype: Optional[torch.dtype] = None) -> tuple:
    """Outputs of several projections of one input ``x [..., in]``, each ``[..., out_i]``.
    ``lora_dtype``: run the LoRA branches in this dtype (default: A's), as autocast would;
    the gradients of A and B still come back in their own dtype."""
    projs = [as_projection(p) for p in projs]
    _check_input(x, projs)
    lead = x.shape[:-1]
    outs = _LoraProjectionsFn.apply(x.reshape(-1, x.shape[-1]), projs, lora_dtype, *_flat_params(projs))
    return tuple(o.view(*lead, o.shape[-1]) for o in outs)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor],
                scale: float, bias: Optional[torch.Tensor] = None,
                quant_state: Optional[QuantState4bit] = None) -> torch.Tensor:
    """``x Wᵀ + b + scale·(x Aᵀ) Bᵀ``. ``weight`` is dense, or packed 4-bit bytes with ``quant_state``."""
    return lora_projections(x, [LoraProjection(weight, A, B, scale, bias, quant_state)])[0]


def lora_qkv(x: torch.Tensor, q: ProjectionLike, k: ProjectionLike, v: ProjectionLike) -> tuple:
    """(q, k, v) projections of one input, sharing the saved x and one dx accumulator."""
    return lora_projections(x, [q, k, v])


def lora_gated_mlp(x: torch.Tensor, gate: ProjectionLike, up: Optional[ProjectionLike], down: ProjectionLike,
                   activation: str = "swiglu", lora_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``; ``up=None`` means ``gate`` is a fused gate_up projection
    whose output halves are [gate | up] (Phi-3). ``lora_dtype`` as in :func:`lora_projections`."""
    gated_activation_spec(activation)   # ValueError for an unknown name
    up_projs = [as_projection(gate)] + ([] if up is None else [as_projection(up)])
    down = as_projection(down)
    _check_input(x, up_projs)
    inter = sum(p.out_features for p in up_projs) // 2
    if up is None and up_projs[0].out_features % 2:
        raise ValueError("a fused gate_up projection needs an even output size")
    if up is not None and up_projs[0].out_features != up_projs[1].out_features:
        raise ValueError("gate and up projections must have one output size")
    if down.in_features != inter:
        raise ValueError(f"down projection expects {down.in_features} features, gate/up give {inter}")
    projs = up_projs + [down]
    lead = x.shape[:-1]
    y = _LoraGatedMLPFn.apply(x.reshape(-1, x.shape[-1]), projs, activation, lora_dtype, *_flat_params(projs))
    return y.view(*lead, y.shape[-1])


# ----------------------------------------------------------------------------- references
# Plain autograd, PEFT's lora.Linear semantics; used by the tests.

def _dense_weight_reference(p: LoraProjection, dtype: torch.dtype) -> torch.Tensor:
    if p.quant is not None:
        return dequantize_4bit_reference(p.weight, p.quant, dtype)
    return p.weight.to(dtype)


def lora_projection_reference(x: torch.Tensor, p: ProjectionLike) -> torch.Tensor:
    p = as_projection(p)
    base = F.linear(x, _dense_weight_reference(p, x.dtype), None if p.bias is None else p.bias.to(x.dtype))
    if not p.has_lora:
        return base
    lora = F.linear(F.linear(x.to(p.A.dtype), p.A), p.B) * p.scale
    return (base + lora).to(base.dtype)


def lora_linear_reference(x, weight, A, B, scale, bias=None, quant_state=None) -> torch.Tensor:
    return lora_projection_reference(x, LoraProjection(weight, A, B, scale, bias, quant_state))


def lora_qkv_reference(x, q, k, v) -> tuple:
    return tuple(lora_projection_reference(x, p) for p in (q, k, v))


def lora_gated_mlp_reference(x, gate, up, down, activation: str = "swiglu") -> torch.Tensor:
    if up is None:
        g, u = lora_projection_reference(x, gate).chunk(2, dim=-1)
    else:
        g, u = lora_projection_reference(x, gate), lora_projection_reference(x, up)
    return lora_projection_reference(gated_activation_reference(activation, g, u), down)
