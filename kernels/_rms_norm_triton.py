"""Triton RMSNorm forward/backward (dX and, when the weight trains, dW).

One program normalises one row in fp32. Backward recomputes 1/rms from x (the row is loaded
anyway), so only x is saved. dW: each program walks a contiguous block of rows and keeps an
fp32 partial sum; the partials are summed by torch.

The forward pass rounds where ``rms_norm_reference`` rounds: the Llama flavour rounds the
normalised row to x's dtype (and ``offset + w`` to w's dtype) before the weight product, so
half-precision outputs match Hugging Face's modules (bit for bit in the fp16 tests).

Wrapped as ``torch.library.custom_op`` so torch.compile treats it as one opaque op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rms_norm import rms_norm_reference

MAX_HIDDEN = 65536


@triton.jit
def _effective_weight(w_ptr, cols, mask, offset, CAST_BEFORE_WEIGHT: tl.constexpr,
                      HAS_OFFSET: tl.constexpr):
    w_raw = tl.load(w_ptr + cols, mask=mask, other=0.0)
    w = w_raw.to(tl.float32)
    if HAS_OFFSET:
        w = w + offset
        if CAST_BEFORE_WEIGHT:
            w = w.to(w_raw.dtype).to(tl.float32)  # the reference adds offset in w's dtype
    return w


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, n_cols, eps, offset,
                         CAST_BEFORE_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_raw = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    h = x * rstd
    w = _effective_weight(w_ptr, cols, mask, offset, CAST_BEFORE_WEIGHT, HAS_OFFSET)
    if CAST_BEFORE_WEIGHT:
        h = h.to(x_raw.dtype).to(tl.float32)
    y = h * w
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, dx_ptr, dw_partial_ptr,
                         stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
                         eps, offset, CAST_BEFORE_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr,
                         COMPUTE_DW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        if row < n_rows:
            x_raw = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
            x = x_raw.to(tl.float32)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            h = x * rstd
            # reloaded per row (an L1/L2 hit) rather than held in registers next to dw_acc
            w = _effective_weight(w_ptr, cols, mask, offset, CAST_BEFORE_WEIGHT, HAS_OFFSET)
            dh = dy * w
            # d/dx of x*rstd(x): rstd * (dh - h * mean(dh * h))
            dx = rstd * (dh - h * (tl.sum(dh * h, axis=0) / n_cols))
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                if CAST_BEFORE_WEIGHT:
                    h = h.to(x_raw.dtype).to(tl.float32)
                dw_acc += dy * h
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=mask)


def _launch_params(n_cols: int, backward: bool = False) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    if backward:  # more live rows (x, dy, dw_acc): spread them over more threads
        num_warps = 8 if block <= 1024 else 16 if block <= 4096 else 32
    else:
        num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 8192 else 32
    return block, num_warps


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, cast_before_weight: bool) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if cast_before_weight else x.dtype


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _bwd_programs(x: torch.Tensor, n_rows: int) -> int:
    if x.device.type == "cuda":
        # ptxas (sm_90, bf16): one program fills an SM's registers from hidden 4096 up
        target = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 4  # interpreter: few programs, still more than one partial to reduce
    return max(1, min(n_rows, target))


@torch.library.custom_op("sloth_plugins::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                  cast_before_weight: bool) -> torch.Tensor:
    n_cols = x.shape[-1]
    x2 = _as_rows(x)
    y = torch.empty(x2.shape, dtype=_out_dtype(x, weight, cast_before_weight), device=x.device)
    if x2.shape[0] > 0:
        block, num_warps = _launch_params(n_cols)
        _rms_norm_fwd_kernel[(x2.shape[0],)](
            x2, weight.contiguous(), y, x2.stride(0), y.stride(0), n_cols, eps, offset,
            CAST_BEFORE_WEIGHT=cast_before_weight, HAS_OFFSET=offset != 0.0, BLOCK=block,
            num_warps=num_warps)
    return y.view(x.shape)


@_rms_norm_fwd.register_fake
def _(x, weight, eps, offset, cast_before_weight):
    return torch.empty(x.shape, dtype=_out_dtype(x, weight, cast_before_weight), device=x.device)


@torch.library.custom_op("sloth_plugins::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                  offset: float, cast_before_weight: bool,
                  compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n_cols = x.shape[-1]
    x2, dy2 = _as_rows(x), _as_rows(dy)
    n_rows = x2.shape[0]
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block, num_warps = _launch_params(n_cols, backward=True)
    programs = _bwd_programs(x, n_rows)
    rows_per_program = triton.cdiv(n_rows, programs)
    # Without dW the kernel never touches the partials; dx stands in for the unused pointer.
    partial = torch.empty((programs if compute_dw else 0, n_cols), dtype=torch.float32,
                          device=x.device)
    if n_rows > 0:
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight.contiguous(), dx, partial if compute_dw else dx,
            dy2.stride(0), x2.stride(0), dx.stride(0),
            n_rows, n_cols, rows_per_program, eps, offset,
            CAST_BEFORE_WEIGHT=cast_before_weight, HAS_OFFSET=offset != 0.0,
            COMPUTE_DW=compute_dw, BLOCK=block, num_warps=num_warps)
    if compute_dw:
        dw = partial.sum(0).to(weight.dtype) if n_rows > 0 else torch.zeros_like(weight)
    else:
        dw = weight.new_empty((0,))
    return dx.view(x.shape), dw


@_rms_norm_bwd.register_fake
def _(dy, x, weight, eps, offset, cast_before_weight, compute_dw):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return dx, weight.new_empty(weight.shape if compute_dw else (0,))


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset, cast_before_weight = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.offset, ctx.cast_before_weight = eps, offset, cast_before_weight


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = _rms_norm_bwd(dy, x, weight, ctx.eps, ctx.offset, ctx.cast_before_weight, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                    cast_before_weight: bool = True) -> torch.Tensor:
    if x.shape[-1] > MAX_HIDDEN or weight.shape != x.shape[-1:]:
        return rms_norm_reference(x, weight, eps, offset, cast_before_weight)
    return _rms_norm_fwd(x, weight, float(eps), float(offset), bool(cast_before_weight))
