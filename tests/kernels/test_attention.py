"""Varlen flash attention: the Triton kernel under the interpreter vs the masked reference (CPU),
the reference vs dense masked attention written out by hand, how samples are found in a batch,
and (``-m gpu``) the kernel vs SDPA with per-sample masks in bf16 at real shapes."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sloth_plugins.kernels import _attention_triton as AT
from sloth_plugins.kernels import attention as A

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}



def _cu(lengths, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _qkv(total, n_q, n_k, dim, dtype, device="cpu", layout="tokens"):
    """layout "hf": views of [1, H, T, D] tensors made like HF's proj(x).view(...).transpose(1, 2)."""
    def make(h):
        if layout == "hf":
            t = torch.randn(total, h * dim, dtype=dtype, device=device).view(total, h, dim)
        else:
            t = torch.randn(total, h, dim, dtype=dtype, device=device)
        return t.requires_grad_()
    return make(n_q), make(n_k), make(n_k)


def _check_triton(lengths, n_q, n_k, dim, dtype=torch.float32, layout="tokens", **kw):
    cu = _cu(lengths)
    q, k, v = _qkv(int(cu[-1]), n_q, n_k, dim, dtype, layout=layout)
    before = [t.detach().clone() for t in (q, k, v)]
    out = AT.varlen_attention_triton(q, k, v, cu, max(lengths), **kw)
    ref = A.varlen_attention_reference(q, k, v, cu, **kw)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL[dtype])
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == w.dtype and torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m: f"d{name}: {m}")
    assert all(torch.equal(t.detach(), b) for t, b in zip((q, k, v), before))


# Interpreter blocks: forward/dQ BLOCK_M=32, BLOCK_N=16; dK/dV BLOCK_M=16, BLOCK_N=32. A 70-token
# sample runs the unmasked middle loops of all three kernels; 1-token and empty samples the edges.
@pytest.mark.parametrize("lengths,heads,kw", [
    ([70, 1, 26], (4, 2), {}),
    ([37, 5, 20], (4, 1), dict(sliding_window=7)),
    ([70, 9], (2, 2), dict(sliding_window=24)),
    ([33, 0, 12], (4, 2), dict(softcap=5.0)),
    ([40, 17], (2, 1), dict(causal=False)),
    ([45, 11], (2, 2), dict(causal=False, sliding_window=9)),
    ([29, 6], (4, 2), dict(sliding_window=16, softcap=2.0, scale=0.3)),
], ids=["gqa", "mqa_window7", "window24", "softcap_empty_sample", "bidirectional", "bidir_window", "window_softcap"])
def test_triton_matches_reference_fp32(lengths, heads, kw):
    _check_triton(lengths, *heads, 32, **kw)


@pytest.mark.parametrize("dim", [16, 24], ids=["d16", "d24_masked_head_dim"])
def test_triton_fp16_and_head_dims(dim):
    _check_triton([35, 3, 14], 4, 2, dim, dtype=torch.float16, layout="hf", sliding_window=20)


def test_triton_gpu_dot_path_on_fp16(monkeypatch):
    # On a GPU half-precision operands go to tl.dot unconverted (DOT_IN_INPUT_DTYPE). The
    # interpreter runs that path correctly for fp16 (not bf16), so it is checked here.
    monkeypatch.setattr(AT, "_dot_in_input_dtype", lambda t: t.dtype == torch.float16)
    _check_triton([37, 4, 22], 4, 2, 32, dtype=torch.float16, layout="hf", softcap=3.0)
    _check_triton([40, 9], 2, 1, 16, dtype=torch.float16, sliding_window=18)


def test_triton_hf_layout_is_read_in_place():
    # q/k/v as views with token stride H*D (HF's transposed projections): no copy, same result
    _check_triton([21, 12], 4, 2, 32, layout="hf")


def test_triton_rejects_what_it_cannot_run():
    q = torch.randn(4, 3, 16)
    assert "multiple" in AT.supported(q, torch.randn(4, 2, 16), torch.randn(4, 2, 16))
    assert "head_dim" in AT.supported(torch.randn(4, 2, 320), torch.randn(4, 2, 320), torch.randn(4, 2, 320))
    assert AT.supported(q, torch.randn(4, 1, 16), torch.randn(4, 1, 16)) is None
    with pytest.raises(ValueError):
        AT.varlen_attention_triton(q, torch.randn(4, 2, 16), torch.randn(4, 2, 16), _cu([4]), 4)


def test_opcheck():
    cu = _cu([9, 7])
    q, k, v = _qkv(16, 2, 1, 16, torch.float32)
    torch.library.opcheck(AT._attention_fwd, (q, k, v, cu, 9, 0.25, True, 0, 0.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ------------------------------------------------------------------------ the reference itself

def _dense_attention(q, k, v, allowed, scale, softcap=None):
    """q [B, Hq, S, D]; allowed [B, 1, S, S] written by hand; fp64 softmax."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    seen = allowed.any(-1, keepdim=True)                     # padding rows see nothing: output 0
    allowed = allowed | (~seen & torch.eye(allowed.shape[-1], dtype=torch.bool))
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) * seen
    return (p @ v.double()).transpose(1, 2)


def _hand_mask(sample_ids, causal=True, window=None):
    """sample_ids [B, S] (-1 = padding) -> [B, 1, S, S]; position = index within the sample."""
    sample_ids = torch.as_tensor(sample_ids)
    pos = torch.zeros_like(sample_ids)
    for b in range(sample_ids.shape[0]):
        count = {}
        for s in range(sample_ids.shape[1]):
            sid = int(sample_ids[b, s])
            pos[b, s] = count.get(sid, 0)
            count[sid] = count.get(sid, 0) + 1
    same = (sample_ids[:, :, None] == sample_ids[:, None, :]) & (sample_ids[:, :, None] >= 0)
    i, j = pos[:, :, None], pos[:, None, :]
    if causal:
        same &= j <= i
    if window:
        same &= (i - j < window) & (j - i < window)
    return same[:, None]


def _hf_heads(batch, heads, seq, dim):
    return torch.randn(batch, seq, heads, dim, dtype=torch.float64).transpose(1, 2).requires_grad_()


@pytest.mark.parametrize("case", ["position_restarts", "left_and_right_padding", "padding_and_restarts",
                                  "cu_seqlens", "rows"])
@pytest.mark.parametrize("kw", [{}, dict(sliding_window=3, softcap=4.0)], ids=["plain", "window_softcap"])
def test_packed_attention_reference_matches_hand_written_masks(case, kw):
    batch, seq = (2, 7) if case != "cu_seqlens" else (1, 9)
    q, k, v = _hf_heads(batch, 4, seq, 8), _hf_heads(batch, 2, seq, 8), _hf_heads(batch, 2, seq, 8)
    args = {}
    if case == "position_restarts":
        args["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 0, 1]])
        ids = [[0, 0, 0, 1, 1, 2, 2], [3, 3, 3, 3, 3, 4, 4]]
    elif case == "left_and_right_padding":
        args["padding_mask"] = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 0, 0]])
        # what generate() passes: pads at position 1, kept tokens counting up across the pad
        args["position_ids"] = torch.tensor([[1, 1, 0, 1, 2, 3, 4], [0, 1, 2, 1, 3, 1, 1]])
        ids = [[-1, -1, 0, 0, 0, 0, 0], [1, 1, 1, -1, 1, -1, -1]]
    elif case == "padding_and_restarts":          # packed rows padded to one width (Axolotl multipack)
        args["padding_mask"] = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
        args["position_ids"] = torch.tensor([[0, 1, 0, 1, 2, 0, 0], [0, 1, 2, 0, 0, 1, 2]])
        ids = [[0, 0, 1, 1, 1, -1, -1], [2, 2, 2, 3, 4, 4, 4]]
    elif case == "cu_seqlens":
        args["cu_seqlens"] = _cu([4, 1, 4])
        ids = [[0, 0, 0, 0, 1, 2, 2, 2, 2]]
    else:
        ids = [[0] * seq, [1] * seq]
    out = A.packed_attention(q, k, v, scale=0.5, **args, **kw)
    want = _dense_attention(q, k, v, _hand_mask(ids, window=kw.get("sliding_window")), 0.5, kw.get("softcap"))
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    segments = A.find_segments(batch, seq, device="cpu", **{k_: v_ for k_, v_ in args.items()})
    assert torch.equal(A.segment_mask(segments, sliding_window=kw.get("sliding_window")),
                       _hand_mask(ids, window=kw.get("sliding_window")))


def test_find_segments_rules():
    seg = A.find_segments(2, 4, position_ids=torch.tensor([[0, 1, 0, 1], [5, 6, 7, 8]]))
    assert seg.cu_seqlens.tolist() == [0, 2, 4, 8] and seg.max_seqlen == 4 and seg.packed and seg.index is None
    seg = A.find_segments(2, 4, position_ids=torch.arange(4)[None])          # broadcast rows, not packed
    assert seg.cu_seqlens.tolist() == [0, 4, 8] and not seg.packed
    seg = A.find_segments(2, 3, padding_mask=torch.tensor([[1, 1, 0], [0, 1, 1]]))
    assert seg.index.tolist() == [0, 1, 4, 5] and seg.cu_seqlens.tolist() == [0, 2, 4] and seg.max_seqlen == 2
    seg = A.find_segments(1, 4, padding_mask=torch.tensor([[1, 1, 1, 0]]), position_ids=torch.tensor([[0, 0, 1, 0]]))
    assert seg.index.tolist() == [0, 1, 2] and seg.cu_seqlens.tolist() == [0, 1, 3] and seg.packed
    seg = A.find_segments(1, 5, cu_seqlens=torch.tensor([0, 2, 5]), max_seqlen=3)
    assert seg.cu_seqlens.dtype == torch.int32 and seg.max_seqlen == 3 and seg.packed
    # cu_seqlens that do not cover the batch are ignored in favour of the position ids
    seg = A.find_segments(1, 5, cu_seqlens=torch.tensor([0, 2]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
    assert seg.cu_seqlens.tolist() == [0, 3, 5]


def test_public_entry_point_uses_reference_on_cpu(monkeypatch):
    cu = _cu([5, 3])
    q, k, v = _qkv(8, 2, 2, 16, torch.float32)
    calls = []
    monkeypatch.setattr(AT, "varlen_attention_triton", lambda *a, **k: calls.append(1))
    out = A.varlen_attention(q, k, v, cu)
    assert not calls
    torch.testing.assert_close(out, A.varlen_attention_reference(q, k, v, cu), atol=0, rtol=0)


@pytest.mark.slow
def test_benchmark_smoke_mode(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "attention.json").read_text())["rows"]
    measured = {(r["layout"], r["tokens"], r["impl"]): r for r in rows if "fwd_ms" in r}
    for layout in ("full", "packed"):
        for impl in ("sloth", "sdpa_flash"):
            row = measured[(layout, 96, impl)]
            assert row["rel_err"] <= 1e-4 and row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0
    assert measured[("packed", 96, "sloth")]["samples"] > 1 and ("packed", 96, "sdpa_mask") in measured


# ----------------------------------------------------------------------------- GPU (H200)

def _long_tail_lengths(total, generator, max_len=2048):
    lengths = []
    while sum(lengths) < total:
        n = int(min(max_len, max(1, torch.empty(1).exponential_(1 / 350, generator=generator).item())))
        lengths.append(min(n, total - sum(lengths)))
    return lengths


def _rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _sdpa_packed(q, k, v, cu, window=None):
    """SDPA on the tokens-first layout with a dense per-sample mask (what HF builds for packed rows)."""
    total = q.shape[0]
    segments = A.Segments(None, cu, 0, 1, total)
    mask = A.segment_mask(segments, sliding_window=window)
    qb, kb, vb = (t.transpose(0, 1)[None] for t in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_q,n_k,dim,window,softcap", [
    (32, 8, 128, None, None), (16, 4, 64, None, None), (16, 8, 256, None, None),
    (32, 8, 128, 1024, None), (16, 8, 256, 512, 50.0),
], ids=["llama8b", "d64", "d256", "mistral_window", "gemma2_window_softcap"])
def test_gpu_packed_vs_sdpa_and_fp32(dtype, n_q, n_k, dim, window, softcap):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    lengths = _long_tail_lengths(8192, gen)
    cu = _cu(lengths, "cuda")
    q, k, v = _qkv(8192, n_q, n_k, dim, dtype, device="cuda", layout="hf")
    kw = dict(sliding_window=window, softcap=softcap)
    out = A.varlen_attention(q, k, v, cu, max(lengths), **kw)       # CUDA: the Triton kernel
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = A.varlen_attention_reference(q32, k32, v32, cu, **kw)
    want = (ref, *torch.autograd.grad(ref, (q32, k32, v32), grad.float()))
    if softcap is None:
        sd = _sdpa_packed(q, k, v, cu, window)
        sdpa = (sd, *torch.autograd.grad(sd, (q, k, v), grad))
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        assert torch.isfinite(got[i]).all(), name
        err = _rel_err(got[i], want[i])
        bound = 2 * _rel_err(sdpa[i], want[i]) + 1e-3 if softcap is None else 2e-2
        assert err <= bound, (name, err, bound)


@pytest.mark.gpu
def test_gpu_full_length_rows_match_sdpa_flash():
    torch.manual_seed(0)
    batch, seq, n_q, n_k, dim = 2, 4096, 32, 8, 128
    q, k, v = (torch.randn(batch, seq, h, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for h in (n_q, n_k, n_k))
    out = A.packed_attention(q, k, v)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=True).transpose(1, 2)
    want = (ref, *torch.autograd.grad(ref, (q32, k32, v32), grad.float()))
    sd = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    sdpa = (sd, *torch.autograd.grad(sd, (q, k, v), grad))
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        err, bound = _rel_err(got[i], want[i]), 2 * _rel_err(sdpa[i], want[i]) + 1e-3
        assert err <= bound, (name, err, bound)


@pytest.mark.gpu
def test_gpu_compiles_as_one_op():
    cu = _cu([700, 300, 24], "cuda")
    q, k, v = _qkv(1024, 8, 2, 128, torch.bfloat16, device="cuda")
    fn = torch.compile(lambda q, k, v: A.varlen_attention(q, k, v, cu, 700).float().square().sum(), fullgraph=True)
    loss = fn(q, k, v)
    got = torch.autograd.grad(loss, (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = A.varlen_attention_reference(q32, k32, v32, cu).square().sum()
    want = torch.autograd.grad(ref, (q32, k32, v32))
    assert math.isclose(loss.item(), ref.item(), rel_tol=2e-2)
    for g, w in zip(got, want):
        assert _rel_err(g, w) <= 2e-2
