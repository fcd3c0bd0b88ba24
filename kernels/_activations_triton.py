"""Triton gated activations act(gate) * up, forward and backward, act in silu / gelu / gelu_tanh.

Elementwise over [rows, cols] with any row stride (a chunk of a fused gate_up projection is
read in place). Backward saves only gate and up and recomputes the activation. The forward
rounds act(gate) to the gate dtype before the product, as the reference ``act(g) * u`` does,
so half-precision outputs match it bit for bit in the common case.

Eager calls go through a plain ``autograd.Function``; under ``torch.compile`` (or any tracer)
the same launches run inside a ``torch.library.custom_op``.

A leaf: ``activations.swiglu`` / ``geglu`` decide between these kernels (for inputs ``supported``
takes) and the references.

    silu'(g)      = s * (1 + g * (1 - s)),  s = sigmoid(g)
    gelu'(g)      = Phi(g) + g * phi(g)
    gelu_tanh'(g) = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * c * (1 + 3 * 0.044715 * g^2),
                    t = tanh(c * (g + 0.044715 * g^3)),  c = sqrt(2 / pi)
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._dispatch import eager_call
from ._tuning import measured_choice, row_bucket
from .names import ACT_KIND_IDS

_KINDS = ACT_KIND_IDS
_BLOCK_MAX = 2048


@triton.jit
def _act_and_grad(g, KIND: tl.constexpr):
    if KIND == 0:
        s = tl.sigmoid(g)
        act = g * s
        dact = s * (1.0 + g * (1.0 - s))
    elif KIND == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        dact = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        # tanh from core ops; exp of a non-positive argument never overflows
        e = tl.exp(-2.0 * tl.abs(inner))
        t = tl.where(inner >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 0.134145 * g * g)
    return act, dact


@triton.jit
def _gated_fwd_kernel(g_ptr, u_ptr, o_ptr, n_cols, sg, su, so, KIND: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g_raw = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0)
    g = g_raw.to(tl.float32)
    u = tl.load(u_ptr + row * su + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(g, KIND)
    act = act.to(g_raw.dtype).to(tl.float32)
    tl.store(o_ptr + row * so + cols, (act * u).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(do_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n_cols, sdo, sg, su, sdg, sdu,
                      KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g_raw = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0)
    g = g_raw.to(tl.float32)
    u = tl.load(u_ptr + row * su + cols, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + row * sdo + cols, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, KIND)
    act = act.to(g_raw.dtype).to(tl.float32)
    tl.store(du_ptr + row * sdu + cols, (do * act).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + row * sdg + cols, (do * u * dact).to(dg_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@functools.lru_cache(maxsize=64)
def _launch_settings(n_cols: int) -> tuple[tuple[int, int], ...]:
    """(BLOCK, num_warps) candidates, the first one the default: one program per block of a row.
    Liger-style whole-row programs (BLOCK up to 16k, 16 warps) win on some shapes, 2k blocks on
    others; ``measured_choice`` times them once per shape class on the GPU."""
    full = triton.next_power_of_2(n_cols)
    first = min(full, _BLOCK_MAX)
    out = [(first, 4 if first <= 1024 else 8)]
    for block, warps in ((1024, 4), (4096, 8), (8192, 16), (16384, 16)):
        block = min(block, full)
        if (block, warps) not in out and block >= 256:
            out.append((block, warps))
    return tuple(out)


def _settings(direction: str, kind: str, g2: torch.Tensor, launch) -> tuple[int, int]:
    n_rows, n_cols = g2.shape
    key = ("gated", direction, kind, row_bucket(n_rows), n_cols, g2.dtype, g2.device)
    return measured_choice(key, _launch_settings(n_cols), launch, g2.device)


def _forward(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    g2, u2 = _as_rows(gate), _as_rows(up)
    out = torch.empty(g2.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if out.numel() > 0:
        def launch(setting):
            block, num_warps = setting
            _gated_fwd_kernel[(g2.shape[0], triton.cdiv(g2.shape[1], block))](
                g2, u2, out, g2.shape[1], g2.stride(0), u2.stride(0), out.stride(0),
                KIND=_KINDS[kind], BLOCK=block, num_warps=num_warps)
        launch(_settings("fwd", kind, g2, launch))
    return out.view(gate.shape)


def _backward(d_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
              kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    do2, g2, u2 = _as_rows(d_out), _as_rows(gate), _as_rows(up)
    d_gate = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    d_up = torch.empty(u2.shape, dtype=up.dtype, device=up.device)
    if d_gate.numel() > 0:
        def launch(setting):
            block, num_warps = setting
            _gated_bwd_kernel[(g2.shape[0], triton.cdiv(g2.shape[1], block))](
                do2, g2, u2, d_gate, d_up, g2.shape[1], do2.stride(0), g2.stride(0), u2.stride(0),
                d_gate.stride(0), d_up.stride(0), KIND=_KINDS[kind], BLOCK=block, num_warps=num_warps)
        launch(_settings("bwd", kind, g2, launch))
    return d_gate.view(gate.shape), d_up.view(up.shape)


# ------------------------------------------------------------------------ eager: autograd.Function

class _GatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, kind):
        ctx.save_for_backward(gate, up)
        ctx.kind = kind
        return _forward(gate, up, kind)

    @staticmethod
    def backward(ctx, d_out):
        gate, up = ctx.saved_tensors
        d_gate, d_up = _backward(d_out, gate, up, ctx.kind)
        return (d_gate if ctx.needs_input_grad[0] else None), (
            d_up if ctx.needs_input_grad[1] else None), None


# ------------------------------------------------------------------------ traced: custom_op

@torch.library.custom_op("sloth_plugins::gated_act_fwd", mutates_args=())
def _gated_fwd(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    return _forward(gate, up, kind)


@_gated_fwd.register_fake
def _(gate, up, kind):
    return torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype),
                       device=gate.device)


@torch.library.custom_op("sloth_plugins::gated_act_bwd", mutates_args=())
def _gated_bwd(d_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
               kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(d_out, gate, up, kind)


@_gated_bwd.register_fake
def _(d_out, gate, up, kind):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(up.shape, dtype=up.dtype, device=up.device))


def _setup_context(ctx, inputs, output):
    gate, up, kind = inputs
    ctx.save_for_backward(gate, up)
    ctx.kind = kind


def _custom_op_backward(ctx, d_out):
    gate, up = ctx.saved_tensors
    d_gate, d_up = _gated_bwd(d_out, gate, up, ctx.kind)
    return (d_gate if ctx.needs_input_grad[0] else None), (
        d_up if ctx.needs_input_grad[1] else None), None


_gated_fwd.register_autograd(_custom_op_backward, setup_context=_setup_context)


def _gated(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    if eager_call(gate, up):
        return _GatedFunction.apply(gate, up, kind)
    return _gated_fwd(gate, up, kind)


def supported(gate: torch.Tensor, up: torch.Tensor) -> Optional[str]:
    """None when the kernels take these tensors, else why not (no broadcasting, no 0-d)."""
    if gate.shape != up.shape:
        return f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape"
    if gate.dim() == 0:
        return "0-d tensors"
    return None


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; the tensors must pass ``supported``."""
    return _gated(gate, up, "silu")


def geglu_triton(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(gate) * up; the tensors must pass ``supported``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"geglu approximate must be 'none' or 'tanh', got {approximate!r}")
    return _gated(gate, up, "gelu" if approximate == "none" else "gelu_tanh")
