"""Attention over variable-length samples: causal, GQA, sliding window, logit soft-capping.

Two layouts:

* ``varlen_attention(q, k, v, cu_seqlens, max_seqlen)``: tokens first, ``q`` [T, Hq, D], ``k``/``v``
  [T, Hk, D]; sample ``i`` is tokens ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only to itself.
  CUDA tensors take the Triton kernel (``_attention_triton.py``); anything else the reference.
* ``packed_attention(q, k, v, position_ids=..., padding_mask=..., cu_seqlens=...)``: Hugging Face's
  layout, ``q`` [B, Hq, S, D] in, [B, S, Hq, D] out. A row starts a sample, and so does a token
  whose position id does not continue the previous token's (``pos[t] != pos[t-1] + 1``: position
  ids restarting at 0 in a packed row), transformers' rule for packed rows; or ``cu_seqlens``
  from a padding-free collator say it directly. Tokens a 2-D padding mask marks 0 are dropped
  first and positions compare between kept tokens, so packed rows padded to one width (Axolotl's
  multipack) keep their samples apart too.

Semantics (the reference defines them): scores ``s = scale * q.k`` (``scale`` defaults to
``1/sqrt(D)``); with ``softcap`` they become ``softcap * tanh(s / softcap)``; key ``j`` is visible
to query ``i`` of the same sample when ``j <= i`` (causal) and ``i - j < sliding_window`` (the
window counts the query itself, as transformers' masks do). Query head ``h`` reads key/value
head ``h // (Hq // Hk)``. Softmax and accumulation in fp32; the output has the input dtype.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch

from ._dispatch import use_triton


def _restrict(ok: torch.Tensor, i: torch.Tensor, j: torch.Tensor, causal: bool,
              window: Optional[int]) -> torch.Tensor:
    """``ok`` (in place) where query position i may see key position j: causal, sliding window."""
    if causal:
        ok &= j <= i
    if window:
        ok &= j > i - window
        if not causal:
            ok &= j < i + window
    return ok


def _allowed(n: int, causal: bool, window: Optional[int], device) -> torch.Tensor:
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return _restrict(torch.ones(n, n, dtype=torch.bool, device=device), i, j, causal, window)


def _bounds(cu_seqlens: torch.Tensor) -> List[int]:
    return [int(x) for x in cu_seqlens.tolist()]


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               max_seqlen: Optional[int] = None, *, scale: Optional[float] = None,
                               causal: bool = True, sliding_window: Optional[int] = None,
                               softcap: Optional[float] = None) -> torch.Tensor:
    """One sample at a time, in fp32 (fp64 for fp64 inputs), with an explicit mask. Tokens outside
    every sample get 0."""
    total, n_q_heads, head_dim = q.shape
    group = n_q_heads // k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    acc = torch.promote_types(q.dtype, torch.float32)          # fp64 inputs stay fp64 (tests)
    out = q.new_zeros((total, n_q_heads, v.shape[-1]), dtype=acc)
    pieces = []
    bounds = _bounds(cu_seqlens)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qs = q[start:end].to(acc).transpose(0, 1)
        ks = k[start:end].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)
        s = (qs @ ks.transpose(-1, -2)) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~_allowed(end - start, causal, sliding_window, q.device), float("-inf"))
        pieces.append((start, end, (torch.softmax(s, dim=-1) @ vs).transpose(0, 1)))
    if not pieces:
        return out.to(q.dtype) + 0 * (q.sum() + k.sum() + v.sum())
    # index_copy keeps the graph differentiable without in-place writes into a leaf
    idx = torch.cat([torch.arange(a, b, device=q.device) for a, b, _ in pieces])
    return out.index_copy(0, idx, torch.cat([o for _, _, o in pieces])).to(q.dtype)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: Optional[int] = None, *, scale: Optional[float] = None, causal: bool = True,
                     sliding_window: Optional[int] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hk, D], cu_seqlens [N + 1] (int, starts at 0, ends at T) -> [T, Hq, D]."""
    kw = dict(scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap)
    if _triton_enabled(q, k, v):
        from ._attention_triton import supported, varlen_attention_triton
        if supported(q, k, v) is None:
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
            return varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, **kw)
    return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, **kw)


def _triton_enabled(*tensors: torch.Tensor) -> bool:
    # one place for tests to force the Triton path under the interpreter
    return use_triton(*tensors)


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None when the Triton kernel takes these [T, H, D] tensors, else why not (CPU: no Triton)."""
    if not _triton_enabled(q, k, v):
        return "tensors are not on a CUDA device with Triton"
    from ._attention_triton import supported
    return supported(q, k, v)


# ------------------------------------------------------------------------------------------------
# Finding the samples of a batch in Hugging Face's layout.

class Segments(NamedTuple):
    """Samples of a [B, S] batch as a flat token list: ``index`` selects the kept tokens of the
    flattened batch (None: all B*S of them, in order); sample i is ``cu_seqlens[i]:cu_seqlens[i+1]``
    of that list."""
    index: Optional[torch.Tensor]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seq: int

    @property
    def n_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def packed(self) -> bool:
        """More samples than rows: several samples share a row."""
        return self.n_samples > self.batch


def find_segments(batch: int, seq: int, *, position_ids: Optional[torch.Tensor] = None,
                  padding_mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  max_seqlen: Optional[int] = None, device=None) -> Segments:
    """The samples of a [B, S] batch (see the module docstring for the rules).

    ``cu_seqlens`` (from a padding-free collator, over the flattened batch) is used when it
    covers exactly B*S tokens and nothing is padded. Costs a device sync or two (the longest
    sample) unless ``max_seqlen`` is given with ``cu_seqlens`` or each row is one sample.
    """
    device = device if device is not None else next(
        (t.device for t in (position_ids, padding_mask, cu_seqlens) if t is not None), "cpu")
    total = batch * seq
    if padding_mask is not None and not bool(padding_mask.all()):
        valid = padding_mask.to(device=device, dtype=torch.bool).reshape(batch, -1)[:, -seq:]
        index = valid.reshape(-1).nonzero().squeeze(1)
        row = index // seq
        starts = torch.ones_like(index, dtype=torch.bool)
        starts[1:] = row[1:] != row[:-1]
        if position_ids is not None:
            pos = position_ids.to(device).reshape(-1, seq).expand(batch, seq).reshape(-1)[index]
            starts[1:] |= pos[1:] != pos[:-1] + 1
        cu = torch.cat([starts.nonzero().squeeze(1), index.new_tensor([index.numel()])]).to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        return Segments(index, cu, longest, batch, seq)
    if cu_seqlens is not None and cu_seqlens.numel() >= 2 and int(cu_seqlens[-1]) == total \
            and int(cu_seqlens[0]) == 0:
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        longest = max_seqlen if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
        return Segments(None, cu, int(longest), batch, seq)
    if position_ids is not None and seq > 1:
        pos = position_ids.to(device).reshape(-1, seq).expand(batch, seq)
        starts = torch.ones(batch, seq, dtype=torch.bool, device=device)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        start_idx = starts.reshape(-1).nonzero().squeeze(1)
        if start_idx.numel() > batch:
            cu = torch.cat([start_idx, start_idx.new_tensor([total])]).to(torch.int32)
            return Segments(None, cu, int((cu[1:] - cu[:-1]).max()), batch, seq)
    cu = torch.arange(0, total + 1, seq, device=device, dtype=torch.int32) if seq > 0 else \
        torch.zeros(batch + 1, device=device, dtype=torch.int32)
    return Segments(None, cu, seq, batch, seq)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B*S, H, D]; a view for Hugging Face's transposed projections."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, h, d)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segments: Optional[Segments] = None,
                     position_ids: Optional[torch.Tensor] = None, padding_mask: Optional[torch.Tensor] = None,
                     cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                     scale: Optional[float] = None, causal: bool = True, sliding_window: Optional[int] = None,
                     softcap: Optional[float] = None) -> torch.Tensor:
    """q [B, Hq, S, D], k/v [B, Hk, S, D] -> [B, S, Hq, D]; padding positions get 0."""
    batch, n_q_heads, seq, head_dim = q.shape
    if segments is None:
        segments = find_segments(batch, seq, position_ids=position_ids, padding_mask=padding_mask,
                                 cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, device=q.device)
    qt, kt, vt = _tokens(q), _tokens(k), _tokens(v)
    if segments.index is not None:
        qt, kt, vt = (t.index_select(0, segments.index) for t in (qt, kt, vt))
    out = varlen_attention(qt, kt, vt, segments.cu_seqlens, segments.max_seqlen, scale=scale, causal=causal,
                           sliding_window=sliding_window, softcap=softcap)
    if segments.index is not None:
        out = out.new_zeros((batch * seq, n_q_heads, out.shape[-1])).index_copy(0, segments.index, out)
    return out.reshape(batch, seq, n_q_heads, -1)


def segment_mask(segments: Segments, *, causal: bool = True, sliding_window: Optional[int] = None) -> torch.Tensor:
    """The dense [B, 1, S, S] boolean mask (True = attend) that describes the same attention, for
    SDPA / eager comparisons. Memory grows as S^2: tests and benchmarks only. Padding rows attend
    to nothing."""
    batch, seq = segments.batch, segments.seq
    device = segments.cu_seqlens.device
    n = segments.n_samples
    lengths = (segments.cu_seqlens[1:] - segments.cu_seqlens[:-1]).long()
    sample = torch.repeat_interleave(torch.arange(n, device=device), lengths)
    offset = torch.arange(sample.numel(), device=device) - segments.cu_seqlens[:-1].long()[sample]
    sample_full = torch.full((batch * seq,), -1, dtype=torch.long, device=device)
    pos_full = torch.zeros(batch * seq, dtype=torch.long, device=device)
    index = segments.index if segments.index is not None else torch.arange(batch * seq, device=device)
    sample_full[index] = sample
    pos_full[index] = offset
    sample_full, pos_full = sample_full.view(batch, seq), pos_full.view(batch, seq)
    same = (sample_full[:, :, None] == sample_full[:, None, :]) & (sample_full[:, :, None] >= 0)
    return _restrict(same, pos_full[:, :, None], pos_full[:, None, :], causal, sliding_window)[:, None]
