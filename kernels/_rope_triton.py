"""Triton rotate-half RoPE on q and k in one launch, forward and backward.

Each program rotates one [BLOCK_H heads, BLOCK_S positions, head_dim] tile of q or of k (the
first programs cover q, the rest k, so GQA head counts need nothing special). The tile's
shape follows the tensor's memory layout, chosen per tensor on the host:
  * heads inner (Hugging Face's ``proj(x).view(B, S, H, D).transpose(1, 2)``): all heads of a
    couple of positions, one contiguous slab;
  * positions inner (a contiguous [B, H, S, D] tensor, e.g. most incoming gradients): a few
    heads times a run of positions, each head's part contiguous.
Either way every program reads and writes a few long contiguous runs. (A tile of all heads at
one position in the positions-inner layout is 40 separate 256-byte pieces, 512 KiB apart: the
old backward ran 4x slower than the forward for exactly that reason.) Outputs keep the input's
layout. Channels past ``cos.shape[-1]`` (partial rotary) are copied through.

With halves x1, x2 and cos/sin halves c1, c2, s1, s2:
    forward   o1 = x1*c1 - x2*s1          o2 = x2*c2 + x1*s2
    backward dx1 = g1*c1 + g2*s2         dx2 = g2*c2 - g1*s1
so backward is the forward with (s1, s2) -> (-s2, -s1): exact for any table, and the usual
"rope with -sin" when the halves of sin are equal (every Hugging Face rotary module). Loading
both halves costs only cache traffic: the tables are small next to q and k.

Eager calls go through a plain ``autograd.Function``; under ``torch.compile`` (or any tracer)
the same launch runs inside a ``torch.library.custom_op``.

A leaf: ``rope.apply_rope`` decides between this kernel (for inputs ``supported`` takes) and the
reference.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._dispatch import eager_call

TILE_ELEMENTS = 4096  # per half tile: 64 (head, position) rows of head_dim 128, 16 KiB of bf16 in
NUM_WARPS = 8         # 16 elements of each half per thread
HEADS_PER_TILE = 4    # positions-inner tiles: heads sharing one cos/sin load


@triton.jit
def _rope_tile(x_ptr, o_ptr, cos_ptr, sin_ptr, tile, n_heads, seq_len,
               sxb, sxh, sxs, sob, soh, sos, scb, scs, ssb, sss,
               HALF: tl.constexpr, N_PASS: tl.constexpr, BACKWARD: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr,
               BLOCK_PASS: tl.constexpr):
    # tiles are numbered head block fastest, then position block, then batch
    n_head_blocks = tl.cdiv(n_heads, BLOCK_H)
    n_seq_blocks = tl.cdiv(seq_len, BLOCK_S)
    head_block = tile % n_head_blocks
    seq_block = (tile // n_head_blocks) % n_seq_blocks
    b = (tile // n_head_blocks // n_seq_blocks).to(tl.int64)

    heads = (head_block * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None, None]
    pos = (seq_block * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)[None, :, None]
    d = tl.arange(0, BLOCK_HALF)[None, None, :]
    table_mask = (pos < seq_len) & (d < HALF)
    cos_row = cos_ptr + b * scb + pos * scs
    sin_row = sin_ptr + b * ssb + pos * sss
    c1 = tl.load(cos_row + d, mask=table_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + d, mask=table_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=table_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF + d, mask=table_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1

    row_ok = (heads < n_heads) & (pos < seq_len)
    mask = row_ok & (d < HALF)
    x_row = x_ptr + b * sxb + heads * sxh + pos * sxs
    o_row = o_ptr + b * sob + heads * soh + pos * sos
    x1 = tl.load(x_row + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_row + d, (x1 * c1 - x2 * s1).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF + d, (x2 * c2 + x1 * s2).to(o_ptr.dtype.element_ty), mask=mask)
    if N_PASS > 0:
        p = tl.arange(0, BLOCK_PASS)[None, None, :]
        pmask = row_ok & (p < N_PASS)
        xp = tl.load(x_row + 2 * HALF + p, mask=pmask, other=0.0)
        tl.store(o_row + 2 * HALF + p, xp.to(o_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, q_tiles, seq_len,
                 n_q_heads, n_k_heads,
                 sqb, sqh, sqs, skb, skh, sks, sqob, sqoh, sqos, skob, skoh, skos,
                 scb, scs, ssb, sss,
                 HALF: tl.constexpr, N_PASS: tl.constexpr, BACKWARD: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_SQ: tl.constexpr,
                 BLOCK_HK: tl.constexpr, BLOCK_SK: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    pid = tl.program_id(0)
    if pid < q_tiles:
        _rope_tile(q_ptr, qo_ptr, cos_ptr, sin_ptr, pid, n_q_heads, seq_len,
                   sqb, sqh, sqs, sqob, sqoh, sqos, scb, scs, ssb, sss,
                   HALF, N_PASS, BACKWARD, BLOCK_HQ, BLOCK_SQ, BLOCK_HALF, BLOCK_PASS)
    else:
        _rope_tile(k_ptr, ko_ptr, cos_ptr, sin_ptr, pid - q_tiles, n_k_heads, seq_len,
                   skb, skh, sks, skob, skoh, skos, scb, scs, ssb, sss,
                   HALF, N_PASS, BACKWARD, BLOCK_HK, BLOCK_SK, BLOCK_HALF, BLOCK_PASS)


@functools.lru_cache(maxsize=1024)
def _tile_shape(n_heads: int, seq_len: int, heads_inner: bool, block_half: int,
                tile_elements: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_S) with BLOCK_H * BLOCK_S * block_half about ``tile_elements``, filled
    along the axis that is inner in memory first."""
    rows = max(1, tile_elements // block_half)
    max_h, max_s = triton.next_power_of_2(n_heads), triton.next_power_of_2(seq_len)
    if heads_inner:
        block_h = min(max_h, rows)
        return block_h, min(max_s, max(1, rows // block_h))
    block_s = min(max_s, max(1, rows // HEADS_PER_TILE))
    return min(max_h, max(1, rows // block_s)), block_s


def _heads_inner(x: torch.Tensor) -> bool:
    n_heads, seq_len = x.shape[1], x.shape[2]
    if n_heads == 1 or seq_len == 1:
        return seq_len == 1
    return x.stride(1) <= x.stride(2)


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _out_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # empty_like keeps a dense input's layout (e.g. HF's transposed q) so the kernel writes
    # rows where it reads them; fake and real impls must agree on it.
    return torch.empty_like(_last_dim_dense(x), dtype=dtype)


def _launch(q, k, cos, sin, q_out, k_out, backward: bool) -> None:
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    rot = cos.shape[-1]
    if batch * seq_len == 0:
        return
    q, k = _last_dim_dense(q), _last_dim_dense(k)
    cos = _last_dim_dense(cos).expand(batch, seq_len, rot)
    sin = _last_dim_dense(sin).expand(batch, seq_len, rot)
    half, n_pass = rot // 2, head_dim - rot
    block_half = triton.next_power_of_2(half)
    # the output has the input's layout (see _out_like), so the input's decides the tiling
    tile = TILE_ELEMENTS
    block_hq, block_sq = _tile_shape(n_q_heads, seq_len, _heads_inner(q), block_half, tile)
    block_hk, block_sk = _tile_shape(n_k_heads, seq_len, _heads_inner(k), block_half, tile)
    q_tiles = batch * triton.cdiv(seq_len, block_sq) * triton.cdiv(n_q_heads, block_hq)
    k_tiles = batch * triton.cdiv(seq_len, block_sk) * triton.cdiv(n_k_heads, block_hk)
    _rope_kernel[(q_tiles + k_tiles,)](
        q, k, q_out, k_out, cos, sin, q_tiles, seq_len, n_q_heads, n_k_heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        HALF=half, N_PASS=n_pass, BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_SQ=block_sq,
        BLOCK_HK=block_hk, BLOCK_SK=block_sk, BLOCK_HALF=block_half,
        BLOCK_PASS=triton.next_power_of_2(max(n_pass, 1)),
        num_warps=NUM_WARPS if q.is_cuda else 1)


def _fwd_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


def _forward(q, k, cos, sin):
    q_out, k_out = _out_like(q, _fwd_dtype(q, cos, sin)), _out_like(k, _fwd_dtype(k, cos, sin))
    _launch(q, k, cos, sin, q_out, k_out, backward=False)
    return q_out, k_out


def _backward(dq_out, dk_out, cos, sin, q_dtype, k_dtype):
    dq, dk = _out_like(dq_out, q_dtype), _out_like(dk_out, k_dtype)
    _launch(dq_out, dk_out, cos, sin, dq, dk, backward=True)
    return dq, dk


# ------------------------------------------------------------------------ eager: autograd.Function

class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        # cos/sin: one table per forward, shared by every layer and alive until its backward anyway;
        # kept on ctx, they skip the saved-tensor hooks (checkpointing) that would pass them through
        ctx.cos, ctx.sin = cos, sin
        ctx.dtypes = (q.dtype, k.dtype)
        return _forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq_out, dk_out):  # autograd materialises an unused output's grad as zeros
        cos, sin = ctx.cos, ctx.sin
        dq, dk = _backward(dq_out, dk_out, cos, sin, *ctx.dtypes)
        return dq, dk, None, None


# ------------------------------------------------------------------------ traced: custom_op

@torch.library.custom_op("sloth_plugins::rope_fwd", mutates_args=())
def _rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, cos, sin)


@_rope_fwd.register_fake
def _(q, k, cos, sin):
    return _out_like(q, _fwd_dtype(q, cos, sin)), _out_like(k, _fwd_dtype(k, cos, sin))


@torch.library.custom_op("sloth_plugins::rope_bwd", mutates_args=())
def _rope_bwd(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              q_dtype: torch.dtype, k_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dq_out, dk_out, cos, sin, q_dtype, k_dtype)


@_rope_bwd.register_fake
def _(dq_out, dk_out, cos, sin, q_dtype, k_dtype):
    return _out_like(dq_out, q_dtype), _out_like(dk_out, k_dtype)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_meta = (q.shape, q.dtype)
    ctx.k_meta = (k.shape, k.dtype)


def _custom_op_backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    (q_shape, q_dtype), (k_shape, k_dtype) = ctx.q_meta, ctx.k_meta
    if dq_out is None:
        dq_out = cos.new_zeros(q_shape, dtype=q_dtype)
    if dk_out is None:
        dk_out = cos.new_zeros(k_shape, dtype=k_dtype)
    dq, dk = _rope_bwd(dq_out, dk_out, cos, sin, q_dtype, k_dtype)
    return dq, dk, None, None


_rope_fwd.register_autograd(_custom_op_backward, setup_context=_setup_context)


def supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              unsqueeze_dim: int = 1) -> Optional[str]:
    """None when the kernel takes these tensors, else why not."""
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return "needs q, k [B, H, S, D] and cos, sin [B or 1, S, Drot] (unsqueeze_dim=1)"
    if cos.requires_grad or sin.requires_grad or cos.shape != sin.shape:
        return "cos and sin must have one shape and need no gradient (the kernel computes none for them)"
    batch, _, seq_len, head_dim = q.shape
    rot = cos.shape[-1]
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != head_dim:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, length or head_dim"
    if not (rot % 2 == 0 and 0 < rot <= head_dim and cos.shape[1] == seq_len
            and cos.shape[0] in (1, batch)):
        return f"cos {tuple(cos.shape)} does not fit q {tuple(q.shape)}"
    return None


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Hq, S, D], k: [B, Hk, S, D], cos/sin: [B or 1, S, Drot]: the tensors must pass
    ``supported`` (``rope.apply_rope`` sends the others to the reference)."""
    if eager_call(q, k, cos, sin):
        return _RopeFunction.apply(q, k, cos, sin)
    return _rope_fwd(q, k, cos, sin)
