"""Triton grouped GEMMs for mixture-of-experts MLPs: tokens sorted by expert, one launch per GEMM.

A leaf: ``moe.py`` sorts the (token, expert) pairs, builds the tile maps below and chains these
launches into the experts' forward and backward. No per-expert Python loop and no host sync:
the grids are sized from upper bounds known on the host (``cdiv(S, BM) + E`` row tiles), and a
program whose tile lies past the last expert's rows returns at once.

Two kernels, both accumulating in fp32 and rounding once on store:

* ``grouped_mm``:  ``out[s, n] = sum_k X[row(s), k] * W[e(s), n, k]`` for the sorted rows ``s``
  of each expert ``e``; ``row`` is an optional gather (the token a sorted row comes from), and
  ``W``'s strides are arguments, so the same kernel multiplies by ``W[e]`` or by ``W[e]ᵀ``.
* ``grouped_wgrad``: ``dW[e, n, k] = sum_{s of e} A[rowA(s), n] * scale(s) * B[rowB(s), k]``,
  the weight gradient of one expert: each program owns one ``[BN, BK]`` tile of one expert and
  walks that expert's rows; an expert without rows gets zeros.

X / A / B are read in the weight's dtype (X is cast on load, as transformers' grouped_mm casts
its input to the weight dtype). fp32 operands multiply in IEEE fp32 (no TF32).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_mm_kernel(x_ptr, w_ptr, out_ptr, rows_ptr, tile_expert_ptr, tile_start_ptr, expert_end_ptr,
                       N, K, stride_xm, stride_we, stride_wn, stride_wk, stride_om,
                       GATHER: tl.constexpr, IEEE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    start = tl.load(tile_start_ptr + pid_m)
    end = tl.load(expert_end_ptr + e)
    offs_m = start + tl.arange(0, BM)
    mask_m = offs_m < end
    if GATHER:
        rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        rows = offs_m.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        a = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = a.to(b.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _grouped_wgrad_kernel(a_ptr, b_ptr, out_ptr, a_rows_ptr, b_rows_ptr, scale_ptr, expert_start_ptr,
                          expert_end_ptr, N, K, stride_am, stride_bm, stride_oe, stride_on, stride_ok,
                          GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE: tl.constexpr,
                          IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)          # tiles of one expert side by side: they walk the same rows
    e = tl.program_id(1)
    tiles_k = tl.cdiv(K, BK)
    pid_n = pid // tiles_k
    pid_k = pid % tiles_k
    start = tl.load(expert_start_ptr + e)
    end = tl.load(expert_end_ptr + e)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(start, end, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < end
        if GATHER_A:
            rows_a = tl.load(a_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            rows_a = offs_m.to(tl.int64)
        if GATHER_B:
            rows_b = tl.load(b_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            rows_b = offs_m.to(tl.int64)
        a = tl.load(a_ptr + rows_a[None, :] * stride_am + offs_n[:, None],
                    mask=mask_m[None, :] & mask_n[:, None], other=0.0)          # [BN, BM] = Aᵀ
        b = tl.load(b_ptr + rows_b[:, None] * stride_bm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)          # [BM, BK]
        if SCALE:
            s = tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            a = a.to(tl.float32) * s[None, :]
        a = a.to(out_ptr.dtype.element_ty)
        b = b.to(out_ptr.dtype.element_ty)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out = out_ptr + e.to(tl.int64) * stride_oe + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


class Routing:
    """The (token, expert) pairs of one call sorted by expert, and the tile maps of the GEMMs.

    ``order``: for each sorted row, its index in the flattened ``top_k_index``; ``token``: the
    token it comes from (``order // top_k``); ``start`` / ``end``: each expert's sorted rows.
    """

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, block_m: int):
        flat = top_k_index.reshape(-1)
        self.top_k = top_k_index.shape[-1]
        self.rows = flat.numel()
        self.num_experts = num_experts
        self.block_m = block_m
        _, order = torch.sort(flat, stable=True)
        self.order = order
        self.token = (order // self.top_k).to(torch.int32)
        counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
        self.end = torch.cumsum(counts, 0).to(torch.int32)
        self.start = (self.end - counts).to(torch.int32)
        # row tiles: expert e owns cdiv(count_e, BM) tiles, starting at its first row
        tiles = (counts + block_m - 1) // block_m
        tile_end = torch.cumsum(tiles, 0)
        self.max_tiles = triton.cdiv(self.rows, block_m) + num_experts
        t = torch.arange(self.max_tiles, device=flat.device)
        expert = torch.searchsorted(tile_end, t, right=True)
        valid = expert < num_experts
        expert_c = expert.clamp(max=num_experts - 1)
        first_tile = tile_end[expert_c] - tiles[expert_c]
        self.tile_start = (self.start.long()[expert_c] + (t - first_tile) * block_m).to(torch.int32)
        self.tile_expert = torch.where(valid, expert_c, torch.full_like(expert_c, -1)).to(torch.int32)

    def unsort(self) -> torch.Tensor:
        """For each flattened (token, k) pair, its sorted row."""
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        return inverse


def _blocks(n: int, k: int, dtype: torch.dtype, block_m: int):
    bn = 128 if n >= 128 else max(16, triton.next_power_of_2(n))
    bk = 64 if dtype != torch.float32 else 32
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    return block_m, bn, bk


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, routing: Routing, transpose: bool = True,
               gather: bool = False, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Sorted rows times each one's expert weight: ``x[row] @ weight[e]ᵀ`` (``transpose``, weight
    ``[E, N, K]``) or ``x[row] @ weight[e]`` (weight ``[E, K, N]``). ``gather``: row s reads
    ``x[routing.token[s]]`` instead of ``x[s]``. Returns ``[routing.rows, N]``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if transpose:
        n, k = weight.shape[1], weight.shape[2]
        stride_wn, stride_wk = weight.stride(1), weight.stride(2)
    else:
        k, n = weight.shape[1], weight.shape[2]
        stride_wn, stride_wk = weight.stride(2), weight.stride(1)
    if x.shape[-1] != k:
        raise ValueError(f"grouped_mm: x has {x.shape[-1]} columns, the weight expects {k}")
    out = torch.empty(routing.rows, n, dtype=out_dtype or weight.dtype, device=x.device)
    if routing.rows == 0:
        return out
    bm, bn, bk = _blocks(n, k, weight.dtype, routing.block_m)
    grid = (routing.max_tiles, triton.cdiv(n, bn))
    rows = routing.token if gather else routing.tile_expert   # any int32 tensor when not gathering
    _grouped_mm_kernel[grid](x, weight, out, rows, routing.tile_expert, routing.tile_start, routing.end,
                             n, k, x.stride(0), weight.stride(0), stride_wn, stride_wk, out.stride(0),
                             GATHER=gather, IEEE=weight.dtype == torch.float32, BM=bm, BN=bn, BK=bk,
                             num_warps=4)
    return out


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, routing: Routing, dtype: torch.dtype,
                  gather_a: bool = False, gather_b: bool = False,
                  scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dW[e] = sum over e's sorted rows s of (scale[s] * a[rowA(s)])ᵀ b[rowB(s)]``: ``[E, N, K]``
    with N = a's columns, K = b's columns, in ``dtype``."""
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    n, k = a.shape[-1], b.shape[-1]
    out = torch.empty(routing.num_experts, n, k, dtype=dtype, device=a.device)
    bm = 32 if dtype == torch.float32 else 64
    bn = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    bk = 64 if k >= 64 else max(16, triton.next_power_of_2(k))
    grid = (triton.cdiv(n, bn) * triton.cdiv(k, bk), routing.num_experts)
    tok = routing.token
    _grouped_wgrad_kernel[grid](a, b, out, tok, tok, scale if scale is not None else tok, routing.start,
                                routing.end, n, k, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
                                out.stride(2), GATHER_A=gather_a, GATHER_B=gather_b, SCALE=scale is not None,
                                IEEE=dtype == torch.float32, BM=bm, BN=bn, BK=bk, num_warps=4)
    return out
