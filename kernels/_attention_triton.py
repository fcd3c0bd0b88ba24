"""Triton flash attention over variable-length samples (contract: ``attention.py``).

Layout: tokens first. ``q`` is [T, Hq, D], ``k``/``v`` are [T, Hk, D] (Hq a multiple of Hk: GQA),
any strides on the token and head axes, unit stride on D. Sample ``i`` owns tokens
``cu_seqlens[i]:cu_seqlens[i+1]``; attention never crosses samples.

Forward, one program per (query block, q head, sample): the online softmax in base 2 (scores are
multiplied by scale*log2(e) once) with fp32 running max / sum / accumulator. The key loop is split
into blocks that need no mask (strictly below the diagonal and inside the window) and blocks that
do (the diagonal, the window's left edge, the sample's end). It saves the log-sum-exp per row.

Backward (FlashAttention-2 order, no atomics): ``delta = rowsum(dO * O)``; one program per
(key block, kv head, sample) accumulates dK and dV over the q heads of its group and the query
blocks that can see it; one program per (query block, q head, sample) accumulates dQ.

Logit soft-capping is ``cap * tanh(s / cap)`` on the scaled scores (Gemma 2); its derivative
``1 - tanh^2`` multiplies dS. The sliding window keeps keys with ``q - W < k`` (and ``k <= q`` when
causal), as transformers' masks and FlashAttention's ``window_size=(W-1, W-1)`` do.

On a GPU, half-precision operands go to ``tl.dot`` as they are (fp32 accumulation). Under
``TRITON_INTERPRET=1`` they are upcast right after loading: the interpreter's bf16 arithmetic
is wrong (``DOT_IN_INPUT_DTYPE`` is a constexpr decided on the host).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._cross_entropy_triton import _tanh
from ._dispatch import interpreting

LOG2E = 1.4426950408889634
_HALF = (torch.float16, torch.bfloat16)


@triton.jit
def _scores(qk, scale_log2, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k in fp32 -> scores in log2 units, and tanh(s / cap) for the backward (or None)."""
    if HAS_SOFTCAP:
        # scale_log2 carries log2(e); the cap acts on the natural-unit score s = qk * scale.
        t = _tanh(qk * (scale_log2 / 1.4426950408889634) / softcap)
        return t * (softcap * 1.4426950408889634), t
    return qk * scale_log2, qk


@triton.jit
def _allowed(offs_m, offs_n, seq_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    ok = (offs_n[None, :] < seq_len) & (offs_m[:, None] < seq_len)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if HAS_WINDOW:
        ok = ok & (offs_n[None, :] > offs_m[:, None] - window)
        if not CAUSAL:
            ok = ok & (offs_n[None, :] < offs_m[:, None] + window)
    return ok


@triton.jit
def _allowed_t(offs_n, offs_m, seq_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``_allowed`` transposed: rows are keys, columns queries."""
    ok = (offs_n[:, None] < seq_len) & (offs_m[None, :] < seq_len)
    if CAUSAL:
        ok = ok & (offs_n[:, None] <= offs_m[None, :])
    if HAS_WINDOW:
        ok = ok & (offs_n[:, None] > offs_m[None, :] - window)
        if not CAUSAL:
            ok = ok & (offs_n[:, None] < offs_m[None, :] + window)
    return ok


@triton.jit
def _fwd_blocks(acc, m_i, l_i, q, K, V, sk_t, sv_t, tok0, offs_m, offs_d, d_mask, lo, hi, seq_len,
                scale_log2, softcap, window,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tok_n = (tok0 + offs_n).to(tl.int64)
        kv_mask = (offs_n[:, None] < seq_len) & d_mask[None, :]
        k = tl.load(K + tok_n[:, None] * sk_t + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + tok_n[:, None] * sv_t + offs_d[None, :], mask=kv_mask, other=0.0)
        if not DOT_IN_INPUT_DTYPE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s, _ = _scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), scale_log2, softcap, HAS_SOFTCAP)
        if MASKED:
            s = tl.where(_allowed(offs_m, offs_n, seq_len, window, CAUSAL, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DOT_IN_INPUT_DTYPE:
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            acc = tl.dot(p, v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, total_tokens, group,
                scale_log2, softcap, window,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                DOT_IN_INPUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # heaviest query blocks (the end of the longest samples, under a causal mask) start first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    sample = tl.program_id(2)
    tok0 = tl.load(CU + sample)
    seq_len = tl.load(CU + sample + 1) - tok0
    m0 = pid_m * BLOCK_M
    if m0 >= seq_len:
        return
    kv_head = head // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < seq_len
    tok_m = (tok0 + offs_m).to(tl.int64)
    q = tl.load(Q + tok_m[:, None] * sq_t + head * sq_h + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if not DOT_IN_INPUT_DTYPE:
        q = q.to(tl.float32)
    K += kv_head * sk_h
    V += kv_head * sv_h

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if CAUSAL:
        diag_lo = m0
        hi = tl.minimum(seq_len, m0 + BLOCK_M)
        full_lo = 0
        if HAS_WINDOW:
            lo = (tl.maximum(0, m0 - window + 1) // BLOCK_N) * BLOCK_N
            full_lo = tl.minimum(diag_lo, tl.cdiv(tl.maximum(0, m0 + BLOCK_M - window), BLOCK_N) * BLOCK_N)
            acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, K, V, sk_t, sv_t, tok0, offs_m, offs_d, d_mask,
                                        lo, full_lo, seq_len, scale_log2, softcap, window, BLOCK_N, True,
                                        CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_IN_INPUT_DTYPE, PRECISION)
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, K, V, sk_t, sv_t, tok0, offs_m, offs_d, d_mask,
                                    full_lo, diag_lo, seq_len, scale_log2, softcap, window, BLOCK_N, False,
                                    CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_IN_INPUT_DTYPE, PRECISION)
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, K, V, sk_t, sv_t, tok0, offs_m, offs_d, d_mask,
                                    diag_lo, hi, seq_len, scale_log2, softcap, window, BLOCK_N, True,
                                    CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_IN_INPUT_DTYPE, PRECISION)
    else:
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, K, V, sk_t, sv_t, tok0, offs_m, offs_d, d_mask,
                                    0, seq_len, seq_len, scale_log2, softcap, window, BLOCK_N, True,
                                    CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_IN_INPUT_DTYPE, PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + tok_m[:, None] * so_t + head * so_h + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))   # +inf: a row that saw no key
    tl.store(LSE + head.to(tl.int64) * total_tokens + tok_m, lse, mask=m_mask)


@triton.jit
def _delta_kernel(O, DO, DELTA, so_t, so_h, sdo_t, sdo_h, total_tokens,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < total_tokens) & (offs_d[None, :] < HEAD_DIM)
    tok = offs_m.to(tl.int64)
    o = tl.load(O + tok[:, None] * so_t + head * so_h + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + tok[:, None] * sdo_t + head * sdo_h + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + head * total_tokens + tok, tl.sum(o * do, 1), mask=offs_m < total_tokens)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, sq_t, sdo_t, tok0, offs_n, offs_d, d_mask, lo, hi, seq_len,
                 scale_log2, softcap, window,
                 BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # Transposed tiles ([keys, queries]) so dK and dV come out of plain dots.
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seq_len
        tok_m = (tok0 + offs_m).to(tl.int64)
        q = tl.load(Q + tok_m[:, None] * sq_t + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        do = tl.load(DO + tok_m[:, None] * sdo_t + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                     other=0.0)
        if not DOT_IN_INPUT_DTYPE:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + tok_m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + tok_m, mask=m_mask, other=0.0)
        s_t, t_t = _scores(tl.dot(k, tl.trans(q), input_precision=PRECISION), scale_log2, softcap, HAS_SOFTCAP)
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(_allowed_t(offs_n, offs_m, seq_len, window, CAUSAL, HAS_WINDOW), p_t, 0.0)
        if DOT_IN_INPUT_DTYPE:
            dv = tl.dot(p_t.to(do.dtype), do, dv)
        else:
            dv = tl.dot(p_t, do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        if DOT_IN_INPUT_DTYPE:
            dk = tl.dot(ds_t.to(q.dtype), q, dk)
        else:
            dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU,
                 sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h,
                 total_tokens, group, scale, scale_log2, softcap, window,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 DOT_IN_INPUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    sample = tl.program_id(2)
    tok0 = tl.load(CU + sample)
    seq_len = tl.load(CU + sample + 1) - tok0
    n0 = pid_n * BLOCK_N
    if n0 >= seq_len:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_mask = offs_n < seq_len
    tok_n = (tok0 + offs_n).to(tl.int64)
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + tok_n[:, None] * sk_t + kv_head * sk_h + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + tok_n[:, None] * sv_t + kv_head * sv_h + offs_d[None, :], mask=kv_mask, other=0.0)
    if not DOT_IN_INPUT_DTYPE:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks that can see this key block: [lo, hi). Those overlapping the diagonal and the
    # tail (sample end, window edge) are masked; the ones between are not.
    hi = seq_len
    full_hi = (seq_len // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(tl.cdiv(n0 + BLOCK_N, BLOCK_M) * BLOCK_M, seq_len)
        if HAS_WINDOW:
            hi = tl.minimum(seq_len, n0 + BLOCK_N - 1 + window)
            full_hi = tl.minimum(full_hi, tl.cdiv(tl.maximum(0, n0 + window - BLOCK_M + 1), BLOCK_M) * BLOCK_M)
    else:
        lo = 0
        diag_hi = 0
        if HAS_WINDOW:   # both window edges: mask every block
            lo = (tl.maximum(0, n0 - window + 1) // BLOCK_M) * BLOCK_M
            hi = tl.minimum(seq_len, n0 + BLOCK_N - 1 + window)
            diag_hi = lo
            full_hi = lo
    full_hi = tl.maximum(full_hi, diag_hi)
    for j in range(0, group):
        head = (kv_head * group + j).to(tl.int64)
        q_ptr = Q + head * sq_h
        do_ptr = DO + head * sdo_h
        lse_h = LSE + head * total_tokens
        delta_h = DELTA + head * total_tokens
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, lse_h, delta_h, sq_t, sdo_t, tok0, offs_n, offs_d,
                              d_mask, lo, diag_hi, seq_len, scale_log2, softcap, window, BLOCK_M, True,
                              CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_IN_INPUT_DTYPE, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, lse_h, delta_h, sq_t, sdo_t, tok0, offs_n, offs_d,
                              d_mask, diag_hi, full_hi, seq_len, scale_log2, softcap, window, BLOCK_M, False,
                              CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_IN_INPUT_DTYPE, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, lse_h, delta_h, sq_t, sdo_t, tok0, offs_n, offs_d,
                              d_mask, full_hi, hi, seq_len, scale_log2, softcap, window, BLOCK_M, True,
                              CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_IN_INPUT_DTYPE, PRECISION)
    dk = dk * scale
    tl.store(DK + tok_n[:, None] * sdk_t + kv_head * sdk_h + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + tok_n[:, None] * sdv_t + kv_head * sdv_h + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, K, V, sk_t, sv_t, tok0, offs_m, offs_d, d_mask, lo, hi, seq_len,
               scale_log2, softcap, window,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tok_n = (tok0 + offs_n).to(tl.int64)
        kv_mask = (offs_n[:, None] < seq_len) & d_mask[None, :]
        k = tl.load(K + tok_n[:, None] * sk_t + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + tok_n[:, None] * sv_t + offs_d[None, :], mask=kv_mask, other=0.0)
        if not DOT_IN_INPUT_DTYPE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), scale_log2, softcap, HAS_SOFTCAP)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_allowed(offs_m, offs_n, seq_len, window, CAUSAL, HAS_WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        if DOT_IN_INPUT_DTYPE:
            dq = tl.dot(ds.to(k.dtype), k, dq)
        else:
            dq = tl.dot(ds, k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h,
               total_tokens, group, scale, scale_log2, softcap, window,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               DOT_IN_INPUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    sample = tl.program_id(2)
    tok0 = tl.load(CU + sample)
    seq_len = tl.load(CU + sample + 1) - tok0
    m0 = pid_m * BLOCK_M
    if m0 >= seq_len:
        return
    kv_head = head // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < seq_len
    tok_m = (tok0 + offs_m).to(tl.int64)
    qd_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + tok_m[:, None] * sq_t + head * sq_h + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + tok_m[:, None] * sdo_t + head * sdo_h + offs_d[None, :], mask=qd_mask, other=0.0)
    if not DOT_IN_INPUT_DTYPE:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row = head.to(tl.int64) * total_tokens + tok_m
    lse = tl.load(LSE + row, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + row, mask=m_mask, other=0.0)
    K += kv_head * sk_h
    V += kv_head * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        diag_lo = m0
        hi = tl.minimum(seq_len, m0 + BLOCK_M)
        full_lo = 0
        if HAS_WINDOW:
            lo = (tl.maximum(0, m0 - window + 1) // BLOCK_N) * BLOCK_N
            full_lo = tl.minimum(diag_lo, tl.cdiv(tl.maximum(0, m0 + BLOCK_M - window), BLOCK_N) * BLOCK_N)
            dq = _dq_blocks(dq, q, do, lse, delta, K, V, sk_t, sv_t, tok0, offs_m, offs_d, d_mask, lo, full_lo,
                            seq_len, scale_log2, softcap, window, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                            DOT_IN_INPUT_DTYPE, PRECISION)
        dq = _dq_blocks(dq, q, do, lse, delta, K, V, sk_t, sv_t, tok0, offs_m, offs_d, d_mask, full_lo, diag_lo,
                        seq_len, scale_log2, softcap, window, BLOCK_N, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                        DOT_IN_INPUT_DTYPE, PRECISION)
        dq = _dq_blocks(dq, q, do, lse, delta, K, V, sk_t, sv_t, tok0, offs_m, offs_d, d_mask, diag_lo, hi,
                        seq_len, scale_log2, softcap, window, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                        DOT_IN_INPUT_DTYPE, PRECISION)
    else:
        dq = _dq_blocks(dq, q, do, lse, delta, K, V, sk_t, sv_t, tok0, offs_m, offs_d, d_mask, 0, seq_len,
                        seq_len, scale_log2, softcap, window, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                        DOT_IN_INPUT_DTYPE, PRECISION)
    dq = dq * scale
    tl.store(DQ + tok_m[:, None] * sdq_t + head * sdq_h + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=qd_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head-dim bucket.
# Starting points from FlashAttention-2-style Triton kernels on Hopper; benchmarks/attention.py
# --tune times alternatives. Under the interpreter small blocks keep tests fast and make
# BLOCK_M != BLOCK_N so every loop-bound branch runs.
_CONFIGS = {
    "fwd": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
    "dkdv": {64: (32, 128, 4, 3), 128: (32, 128, 8, 2), 256: (16, 64, 8, 1)},
    "dq": {64: (128, 32, 4, 3), 128: (128, 32, 8, 2), 256: (64, 32, 8, 1)},
}
_INTERPRETER_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
_overrides: dict = {}


def set_config(kernel: str, block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 1) -> None:
    """Force one kernel's launch configuration (benchmark tuning, tests); ``clear_configs`` undoes it."""
    if kernel not in _CONFIGS:
        raise ValueError(f"kernel must be one of {', '.join(_CONFIGS)}")
    if block_m % 16 or block_n % 16 or (kernel != "dkdv" and block_m % block_n):
        raise ValueError("blocks must be multiples of 16, and BLOCK_M a multiple of BLOCK_N for fwd/dq")
    _overrides[kernel] = (block_m, block_n, num_warps, num_stages)


def clear_configs() -> None:
    _overrides.clear()


def _config(kernel: str, block_d: int) -> Tuple[int, int, int, int]:
    if kernel in _overrides:
        return _overrides[kernel]
    if interpreting():
        return _INTERPRETER_CONFIGS[kernel]
    table = _CONFIGS[kernel]
    return table[min((d for d in table if d >= block_d), default=256)]


MAX_HEAD_DIM = 256


def _dot_in_input_dtype(t: torch.Tensor) -> bool:
    return t.dtype in _HALF and not interpreting()


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _common(q, k, window: int, softcap: float):
    head_dim = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_WINDOW=window > 0, HAS_SOFTCAP=softcap > 0,
                DOT_IN_INPUT_DTYPE=_dot_in_input_dtype(q), PRECISION=_precision(q)), block_d


def _forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float, causal: bool, window: int, softcap: float):
    total, n_q_heads, head_dim = q.shape
    n_samples = cu_seqlens.numel() - 1
    out = torch.empty((total, n_q_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((n_q_heads, total), dtype=torch.float32, device=q.device)
    if total == 0 or n_samples <= 0 or max_seqlen <= 0:
        lse.fill_(float("inf"))
        return out.zero_(), lse
    meta, block_d = _common(q, k, window, softcap)
    block_m, block_n, warps, stages = _config("fwd", block_d)
    grid = (triton.cdiv(max_seqlen, block_m), n_q_heads, n_samples)
    _fwd_kernel[grid](q, k, v, out, lse, cu_seqlens, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                      v.stride(0), v.stride(1), out.stride(0), out.stride(1), total, n_q_heads // k.shape[1],
                      scale * LOG2E, softcap, window, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                      num_warps=warps, num_stages=stages, **meta)
    return out, lse


def _backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen: int, scale: float, causal: bool, window: int,
              softcap: float):
    total, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    n_samples = cu_seqlens.numel() - 1
    dq = torch.empty((total, n_q_heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((total, n_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((total, n_kv_heads, head_dim), dtype=v.dtype, device=v.device)
    if total == 0 or n_samples <= 0 or max_seqlen <= 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    do = _unit_last(do)
    meta, block_d = _common(q, k, window, softcap)
    delta = torch.empty((n_q_heads, total), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(total, 64), n_q_heads)](out, do, delta, out.stride(0), out.stride(1), do.stride(0),
                                                       do.stride(1), total, HEAD_DIM=head_dim, BLOCK_D=block_d,
                                                       BLOCK_M=64)
    group = n_q_heads // n_kv_heads
    common = dict(CAUSAL=causal, **meta)
    block_m, block_n, warps, stages = _config("dkdv", block_d)
    _dkdv_kernel[(triton.cdiv(max_seqlen, block_n), n_kv_heads, n_samples)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        total, group, scale, scale * LOG2E, softcap, window, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages, **common)
    block_m, block_n, warps, stages = _config("dq", block_d)
    _dq_kernel[(triton.cdiv(max_seqlen, block_m), n_q_heads, n_samples)](
        q, k, v, do, lse, delta, dq, cu_seqlens, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        total, group, scale, scale * LOG2E, softcap, window, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library custom ops: torch.compile sees one opaque node each way.

@torch.library.custom_op("sloth_plugins::varlen_attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                   scale: float, causal: bool, window: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(_unit_last(q), _unit_last(k), _unit_last(v), cu_seqlens, max_seqlen, scale, causal, window,
                    softcap)


@_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, causal, window, softcap):
    total, n_q_heads, head_dim = q.shape
    return (q.new_empty((total, n_q_heads, head_dim)),
            q.new_empty((n_q_heads, total), dtype=torch.float32))


@torch.library.custom_op("sloth_plugins::varlen_attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float, causal: bool,
                   window: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, _unit_last(q), _unit_last(k), _unit_last(v), out, lse, cu_seqlens, max_seqlen, scale,
                     causal, window, softcap)


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, window, softcap):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, causal, window, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = (max_seqlen, scale, causal, window, softcap)


def _backward_op(ctx, do, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd(do, q, k, v, out, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward_op, setup_context=_setup_context)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None when the kernel takes these tensors, else why not."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return "q, k, v must be [tokens, heads, head_dim]"
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match"
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads"
    if q.shape[2] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[2]} > {MAX_HEAD_DIM}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one of fp16, bf16, fp32 for all three"
    return None


def varlen_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, scale: Optional[float] = None, causal: bool = True,
                            sliding_window: Optional[int] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """Same contract as ``attention.varlen_attention``; shapes must pass ``supported``, and
    ``cu_seqlens`` must start at 0 and end at T (tokens outside every sample are not written)."""
    reason = supported(q, k, v)
    if reason:
        raise ValueError(reason)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out, _ = _attention_fwd(q, k, v, cu_seqlens, int(max_seqlen), scale, bool(causal),
                            int(sliding_window or 0), float(softcap or 0.0))
    return out
