"""Triton rotate-half RoPE on q and k in one launch, forward and backward.

One program per (batch, position): it loads that position's cos/sin once and rotates every q
head and every k head (GQA: different head counts). Any strides on the batch/head/sequence
axes are fine, so Hugging Face's transposed views ``proj(x).view(B, S, H, D).transpose(1, 2)``
are read in place; outputs keep the input's layout. Channels past ``cos.shape[-1]`` (partial
rotary) are copied through.

With halves x1, x2 and cos/sin halves c1, c2, s1, s2:
    forward   o1 = x1*c1 - x2*s1          o2 = x2*c2 + x1*s2
    backward dx1 = g1*c1 + g2*s2         dx2 = g2*c2 - g1*s1
so backward is the forward with (s1, s2) -> (-s2, -s1) (plain "rope with -sin" when the halves
of sin are equal, as in every Hugging Face rotary module).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope import apply_rope_reference


@triton.jit
def _rotate_heads(x_ptr, o_ptr, b, s, n_heads, sxb, sxh, sxs, sob, soh, sos, c1, c2, s1, s2,
                  HALF: tl.constexpr, N_PASS: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (d < HALF)
    x_row = x_ptr + b * sxb + s * sxs + heads * sxh
    o_row = o_ptr + b * sob + s * sos + heads * soh
    x1 = tl.load(x_row + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + d, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    tl.store(o_row + d, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF + d, o2.to(o_ptr.dtype.element_ty), mask=mask)
    if N_PASS > 0:
        p = tl.arange(0, BLOCK_PASS)[None, :]
        pmask = (heads < n_heads) & (p < N_PASS)
        xp = tl.load(x_row + 2 * HALF + p, mask=pmask, other=0.0)
        tl.store(o_row + 2 * HALF + p, xp.to(o_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, seq_len, n_q_heads, n_k_heads,
                 sqb, sqh, sqs, skb, skh, sks, sqob, sqoh, sqos, skob, skoh, skos,
                 scb, scs, ssb, sss,
                 HALF: tl.constexpr, N_PASS: tl.constexpr, BACKWARD: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_PASS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < HALF
    cos_row = cos_ptr + b * scb + s * scs
    sin_row = sin_ptr + b * ssb + s * sss
    c1 = tl.load(cos_row + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    _rotate_heads(q_ptr, qo_ptr, b, s, n_q_heads, sqb, sqh, sqs, sqob, sqoh, sqos, c1, c2, s1, s2,
                  HALF, N_PASS, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS)
    _rotate_heads(k_ptr, ko_ptr, b, s, n_k_heads, skb, skh, sks, skob, skoh, skos, c1, c2, s1, s2,
                  HALF, N_PASS, BLOCK_HK, BLOCK_HALF, BLOCK_PASS)


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
    block_hq, block_hk = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_k_heads)
    block_half = triton.next_power_of_2(half)
    elements = (block_hq + block_hk) * block_half
    num_warps = 4 if elements <= 4096 else 8
    _rope_kernel[(batch * seq_len,)](
        q, k, q_out, k_out, cos, sin, seq_len, n_q_heads, n_k_heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        HALF=half, N_PASS=n_pass, BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        BLOCK_HALF=block_half, BLOCK_PASS=triton.next_power_of_2(max(n_pass, 1)),
        num_warps=num_warps)


def _fwd_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


@torch.library.custom_op("sloth_plugins::rope_fwd", mutates_args=())
def _rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = _out_like(q, _fwd_dtype(q, cos, sin)), _out_like(k, _fwd_dtype(k, cos, sin))
    _launch(q, k, cos, sin, q_out, k_out, backward=False)
    return q_out, k_out


@_rope_fwd.register_fake
def _(q, k, cos, sin):
    return _out_like(q, _fwd_dtype(q, cos, sin)), _out_like(k, _fwd_dtype(k, cos, sin))


@torch.library.custom_op("sloth_plugins::rope_bwd", mutates_args=())
def _rope_bwd(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              q_dtype: torch.dtype, k_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    dq, dk = _out_like(dq_out, q_dtype), _out_like(dk_out, k_dtype)
    _launch(dq_out, dk_out, cos, sin, dq, dk, backward=True)
    return dq, dk


@_rope_bwd.register_fake
def _(dq_out, dk_out, cos, sin, q_dtype, k_dtype):
    return _out_like(dq_out, q_dtype), _out_like(dk_out, k_dtype)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_meta = (q.shape, q.dtype)
    ctx.k_meta = (k.shape, k.dtype)


def _backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    (q_shape, q_dtype), (k_shape, k_dtype) = ctx.q_meta, ctx.k_meta
    if dq_out is None:
        dq_out = cos.new_zeros(q_shape, dtype=q_dtype)
    if dk_out is None:
        dk_out = cos.new_zeros(k_shape, dtype=k_dtype)
    dq, dk = _rope_bwd(dq_out, dk_out, cos, sin, q_dtype, k_dtype)
    return dq, dk, None, None


_rope_fwd.register_autograd(_backward, setup_context=_setup_context)


def _supported(q, k, cos, sin, unsqueeze_dim) -> bool:
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return False
    if cos.requires_grad or sin.requires_grad or cos.shape != sin.shape:
        return False  # gradients w.r.t. cos/sin are not computed by the kernel
    batch, _, seq_len, head_dim = q.shape
    rot = cos.shape[-1]
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != head_dim:
        return False
    return (rot % 2 == 0 and 0 < rot <= head_dim and cos.shape[1] == seq_len
            and cos.shape[0] in (1, batch))


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Hq, S, D], k: [B, Hk, S, D], cos/sin: [B or 1, S, Drot]; others use the reference."""
    if not _supported(q, k, cos, sin, unsqueeze_dim):
        return apply_rope_reference(q, k, cos, sin, unsqueeze_dim)
    return _rope_fwd(q, k, cos, sin)
