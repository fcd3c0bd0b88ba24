"""Triton RMSNorm forward/backward (dX and, when the weight trains, dW).

Forward and dX: one program normalises one row in fp32 (the whole row sits in registers).
Backward recomputes 1/rms from x (the row is loaded anyway), so only x is saved.

dW = sum over rows of dy * h (h = x / rms, rounded to x's dtype in the Llama flavour). The dX
kernel writes 1/rms per row (4 bytes a row) and a second kernel reduces dy * x * rstd over
rows in [BLOCK_M, BLOCK_N] tiles: each program owns a column block and a contiguous split of
rows and keeps a tile-shaped fp32 accumulator, so the loop has no cross-thread reduction and
many programs stream at once; torch sums the few per-split partials. Re-reading x and dy
costs one extra pass over them, which is cheaper than a fused kernel whose row loop runs one
latency-bound row at a time per SM.

The forward pass rounds where ``rms_norm_reference`` rounds: the Llama flavour rounds the
normalised row to x's dtype (and ``offset + w`` to w's dtype) before the weight product, so
half-precision outputs match Hugging Face's modules (bit for bit in the fp16 tests).

Eager calls go through a plain ``autograd.Function``; under ``torch.compile`` (or any tracer)
the same launches run inside a ``torch.library.custom_op`` that the graph treats as opaque.

A leaf: ``rms_norm.rms_norm`` decides between this kernel (for inputs ``supported`` takes) and
the reference.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._dispatch import eager_call, sm_count

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
def _rms_norm_bwd_dx_kernel(dy_ptr, x_ptr, w_ptr, dx_ptr, rstd_ptr,
                            stride_dy, stride_x, stride_dx, n_cols, eps, offset,
                            CAST_BEFORE_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr,
                            STORE_RSTD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    w = _effective_weight(w_ptr, cols, mask, offset, CAST_BEFORE_WEIGHT, HAS_OFFSET)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    h = x * rstd
    dh = dy * w
    # d/dx of x*rstd(x): rstd * (dh - h * mean(dh * h))
    dx = rstd * (dh - h * (tl.sum(dh * h, axis=0) / n_cols))
    tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_dw_kernel(dy_ptr, x_ptr, rstd_ptr, partial_ptr, stride_dy, stride_x,
                            n_rows, n_cols, rows_per_split,
                            CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    split = tl.program_id(1).to(tl.int64)
    first = split * rows_per_split  # rows_per_split is a multiple of BLOCK_M: splits never overlap
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, rows_per_split, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x_raw = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        h = x_raw.to(tl.float32) * rstd[:, None]  # the same fp32 product the dX kernel forms
        if CAST_BEFORE_WEIGHT:
            h = h.to(x_raw.dtype).to(tl.float32)
        acc += dy * h
    tl.store(partial_ptr + split * n_cols + cols, tl.sum(acc, axis=0), mask=col_mask)


@functools.lru_cache(maxsize=256)
def _row_launch(n_cols: int) -> tuple[int, int]:
    """BLOCK (the padded row) and num_warps for the one-row-per-program kernels."""
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 8192 else 32
    return block, num_warps


@functools.lru_cache(maxsize=256)
def _dw_launch(n_rows: int, n_cols: int, programs_wanted: int, on_gpu: bool):
    """(BLOCK_M, BLOCK_N, rows_per_split, n_splits, num_warps) of the dW reduction.

    GPU: 32 x 128 tiles (256-byte row segments in bf16), 4 warps, about ``programs_wanted``
    programs so several stream per SM. Interpreter: tiny tiles, so the CPU tests cover several
    column blocks, several splits and several row tiles per split.
    """
    block_m, block_n, num_warps = (32, 128, 4) if on_gpu else (4, 32, 1)
    n_col_blocks = triton.cdiv(n_cols, block_n)
    n_splits = max(1, min(triton.cdiv(n_rows, block_m), triton.cdiv(programs_wanted, n_col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, n_splits), block_m) * block_m
    return block_m, block_n, rows_per_split, triton.cdiv(n_rows, rows_per_split), num_warps


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, cast_before_weight: bool) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if cast_before_weight else x.dtype


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
             cast_before_weight: bool) -> torch.Tensor:
    n_cols = x.shape[-1]
    x2 = _as_rows(x)
    y = torch.empty(x2.shape, dtype=_out_dtype(x, weight, cast_before_weight), device=x.device)
    if x2.shape[0] > 0:
        block, num_warps = _row_launch(n_cols)
        _rms_norm_fwd_kernel[(x2.shape[0],)](
            x2, weight.contiguous(), y, x2.stride(0), y.stride(0), n_cols, eps, offset,
            CAST_BEFORE_WEIGHT=cast_before_weight, HAS_OFFSET=offset != 0.0, BLOCK=block,
            num_warps=num_warps)
    return y.view(x.shape)


def _backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
              cast_before_weight: bool, compute_dw: bool):
    """(dx, dw); dw is None unless ``compute_dw``."""
    n_cols = x.shape[-1]
    x2, dy2 = _as_rows(x), _as_rows(dy)
    n_rows = x2.shape[0]
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx.view(x.shape), (torch.zeros_like(weight) if compute_dw else None)
    block, num_warps = _row_launch(n_cols)
    # Without dW the kernel never stores 1/rms; dx stands in for the unused pointer.
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device) if compute_dw else dx
    _rms_norm_bwd_dx_kernel[(n_rows,)](
        dy2, x2, weight.contiguous(), dx, rstd, dy2.stride(0), x2.stride(0), dx.stride(0),
        n_cols, eps, offset, CAST_BEFORE_WEIGHT=cast_before_weight, HAS_OFFSET=offset != 0.0,
        STORE_RSTD=compute_dw, BLOCK=block, num_warps=num_warps)
    dw = None
    if compute_dw:
        on_gpu = x.is_cuda
        wanted = 4 * sm_count(x.device.index) if on_gpu else 4
        block_m, block_n, rows_per_split, n_splits, dw_warps = _dw_launch(n_rows, n_cols, wanted,
                                                                          on_gpu)
        partial = torch.empty((n_splits, n_cols), dtype=torch.float32, device=x.device)
        _rms_norm_bwd_dw_kernel[(triton.cdiv(n_cols, block_n), n_splits)](
            dy2, x2, rstd, partial, dy2.stride(0), x2.stride(0), n_rows, n_cols, rows_per_split,
            CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=dw_warps)
        dw = partial.sum(0) if n_splits > 1 else partial.view(n_cols)
        dw = dw.to(weight.dtype)
    return dx.view(x.shape), dw


# ------------------------------------------------------------------------ eager: autograd.Function

class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast_before_weight):
        ctx.save_for_backward(x)
        # the weight is a parameter: kept as it is, without the saved-tensor hooks (checkpointing)
        ctx.weight, ctx.eps, ctx.offset, ctx.cast_before_weight = weight, eps, offset, cast_before_weight
        return _forward(x, weight, eps, offset, cast_before_weight)

    @staticmethod
    def backward(ctx, dy):
        (x,), weight = ctx.saved_tensors, ctx.weight
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = _backward(dy, x, weight, ctx.eps, ctx.offset, ctx.cast_before_weight, need_dw)
        return (dx if need_dx else None), dw, None, None, None


# ------------------------------------------------------------------------ traced: custom_op

@torch.library.custom_op("sloth_plugins::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                  cast_before_weight: bool) -> torch.Tensor:
    return _forward(x, weight, eps, offset, cast_before_weight)


@_rms_norm_fwd.register_fake
def _(x, weight, eps, offset, cast_before_weight):
    return torch.empty(x.shape, dtype=_out_dtype(x, weight, cast_before_weight), device=x.device)


@torch.library.custom_op("sloth_plugins::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                  offset: float, cast_before_weight: bool,
                  compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = _backward(dy, x, weight, eps, offset, cast_before_weight, compute_dw)
    return dx, (dw if compute_dw else weight.new_empty((0,)))


@_rms_norm_bwd.register_fake
def _(dy, x, weight, eps, offset, cast_before_weight, compute_dw):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return dx, weight.new_empty(weight.shape if compute_dw else (0,))


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset, cast_before_weight = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.offset, ctx.cast_before_weight = eps, offset, cast_before_weight


def _custom_op_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = _rms_norm_bwd(dy, x, weight, ctx.eps, ctx.offset, ctx.cast_before_weight, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None


_rms_norm_fwd.register_autograd(_custom_op_backward, setup_context=_setup_context)


def supported(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """None when the kernel takes these tensors, else why not."""
    if x.shape[-1] > MAX_HIDDEN:
        return f"hidden size {x.shape[-1]} > {MAX_HIDDEN}"
    if weight.shape != x.shape[-1:]:
        return f"weight {tuple(weight.shape)} does not match the last dimension of x {tuple(x.shape)}"
    return None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                    cast_before_weight: bool = True) -> torch.Tensor:
    """Same contract as ``rms_norm.rms_norm``; the tensors must pass ``supported``."""
    args = (x, weight, float(eps), float(offset), bool(cast_before_weight))
    if eager_call(x, weight):
        return _RMSNormFunction.apply(*args)
    return _rms_norm_fwd(*args)
