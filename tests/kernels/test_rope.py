"""Triton RoPE on q and k vs the torch reference: CPU under the interpreter, real shapes on GPU."""
import pytest
import torch

from sloth_plugins.kernels import _rope_triton as T
from sloth_plugins.kernels import rope as R
from sloth_plugins.kernels._rope_triton import _rope_fwd, apply_rope_triton
from sloth_plugins.kernels.rope import apply_rope, apply_rope_reference

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=4e-3)}



def _heads(batch, heads, seq, dim, dtype, transposed, device="cpu"):
    """transposed=True gives Hugging Face's layout: proj(x).view(B, S, H, D).transpose(1, 2)."""
    if transposed:
        t = torch.randn(batch, seq, heads, dim, dtype=dtype, device=device).transpose(1, 2)
    else:
        t = torch.randn(batch, heads, seq, dim, dtype=dtype, device=device)
    return t.requires_grad_()


def _cos_sin(batch, seq, rot, dtype, device="cpu", base=10000.0, offset=0):
    """HF-style tables (duplicated halves); each batch row gets its own positions."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, device=device).float() / rot)
    pos = torch.arange(seq, device=device).float()[None, :] + offset * torch.arange(
        batch, device=device).float()[:, None]
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _grad_like(t, layout):
    """A gradient for output t: 'like' t's own layout, or 'contiguous' / 'transposed' ([B, S, H, D]
    storage) whatever t's layout is, as attention backward kernels hand them back."""
    if layout == "like":
        return torch.randn_like(t)
    if layout == "contiguous":
        return torch.randn(t.shape, dtype=t.dtype)
    b, h, s, d = t.shape
    return torch.randn(b, s, h, d, dtype=t.dtype).transpose(1, 2)


def _check(q, k, cos, sin, tol, grad_layout="like"):
    q_before, k_before = q.detach().clone(), k.detach().clone()
    q_out, k_out = apply_rope_triton(q, k, cos, sin)
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin)
    for got, want in [(q_out, q_ref), (k_out, k_ref)]:
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **tol)
    gq, gk = _grad_like(q_ref, grad_layout), _grad_like(k_ref, grad_layout)
    got = torch.autograd.grad((q_out, k_out), (q, k), (gq, gk))
    want = torch.autograd.grad((q_ref, k_ref), (q, k), (gq, gk))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **tol)
    assert torch.equal(q.detach(), q_before) and torch.equal(k.detach(), k_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "hf_transposed"])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_matches_reference(dtype, transposed, heads):
    n_q, n_k = heads
    q = _heads(2, n_q, 5, 16, dtype, transposed)
    k = _heads(2, n_k, 5, 16, dtype, transposed)
    cos, sin = _cos_sin(2, 5, 16, dtype, offset=3)
    _check(q, k, cos, sin, TOL[dtype])


@pytest.mark.parametrize("tile_elements", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "hf_transposed"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("heads", [(4, 2), (3, 1)], ids=["gqa", "odd_heads"])
def test_many_tiles_with_ragged_heads_and_positions(monkeypatch, tile_elements, dtype, transposed,
                                                    grad_layout, heads):
    # Small tiles: several head blocks and position blocks per tensor, partial ones at the
    # edges, and gradients in the other layout than the forward's (the tiling follows each).
    monkeypatch.setattr(T, "TILE_ELEMENTS", tile_elements)
    n_q, n_k = heads
    seq, half = 7, 8
    for n, inner in [(n_q, True), (n_q, False)]:
        block_h, block_s = T._tile_shape(n, seq, inner, half, tile_elements)
        assert -(-n // block_h) * -(-seq // block_s) > 1, "one tile covers everything"
    q = _heads(2, n_q, seq, 2 * half, dtype, transposed)
    k = _heads(2, n_k, seq, 2 * half, dtype, transposed)
    cos, sin = _cos_sin(2, seq, 2 * half, dtype, offset=5)
    _check(q, k, cos, sin, TOL[dtype], grad_layout)


def test_tiles_follow_the_memory_layout():
    # Llama-3-8B at 2048 positions, head_dim 128: heads-inner tensors take whole rows of heads,
    # positions-inner ones 4 heads x 16 positions; every tile holds 64 rows of 64 pairs
    assert T._tile_shape(32, 2048, True, 64, 4096) == (32, 2)
    assert T._tile_shape(8, 2048, True, 64, 4096) == (8, 8)
    assert T._tile_shape(32, 2048, False, 64, 4096) == (4, 16)
    assert T._tile_shape(8, 2048, False, 64, 4096) == (4, 16)
    hf = torch.empty(1, 5, 3, 8).transpose(1, 2)
    assert T._heads_inner(hf) and not T._heads_inner(hf.contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rot,dim", [(8, 16), (12, 20)], ids=["half_rotary", "odd_pass_width"])
def test_partial_rotary_passes_the_rest_through(dtype, rot, dim):
    q = _heads(2, 4, 3, dim, dtype, True)
    k = _heads(2, 2, 3, dim, dtype, False)
    cos, sin = _cos_sin(2, 3, rot, dtype)
    _check(q, k, cos, sin, TOL[dtype])
    q_out, _ = apply_rope_triton(q, k, cos, sin)
    assert torch.equal(q_out[..., rot:], q[..., rot:])


def test_cos_broadcast_over_batch():
    q, k = _heads(3, 4, 4, 8, torch.float32, True), _heads(3, 2, 4, 8, torch.float32, True)
    cos, sin = _cos_sin(1, 4, 8, torch.float32)
    _check(q, k, cos, sin, TOL[torch.float32])


def test_sin_halves_that_differ():
    # Not what HF builds, but the kernel's backward handles general tables exactly.
    q, k = _heads(1, 2, 3, 8, torch.float32, False), _heads(1, 2, 3, 8, torch.float32, False)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    _check(q, k, cos, sin, TOL[torch.float32])


def test_fp32_tables_on_half_heads_promote_like_reference():
    q, k = _heads(1, 2, 3, 8, torch.float16, True), _heads(1, 1, 3, 8, torch.float16, True)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    _check(q, k, cos, sin, TOL[torch.float16])


def test_only_q_used_downstream():
    q, k = _heads(1, 2, 3, 8, torch.float32, True), _heads(1, 1, 3, 8, torch.float32, True)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    (dq,) = torch.autograd.grad(apply_rope_triton(q, k, cos, sin)[0].sum(), (q,))
    (dq_ref,) = torch.autograd.grad(apply_rope_reference(q, k, cos, sin)[0].sum(), (q,))
    torch.testing.assert_close(dq, dq_ref, **TOL[torch.float32])


def test_custom_op_and_eager_function_agree():
    # eager calls take the autograd.Function, traced ones the custom op: same launches, same bits
    q, k = _heads(2, 4, 5, 16, torch.float32, True), _heads(2, 2, 5, 16, torch.float32, False)
    cos, sin = _cos_sin(2, 5, 16, torch.float32)
    outs_fn, outs_op = apply_rope_triton(q, k, cos, sin), _rope_fwd(q, k, cos, sin)
    grads = [torch.randn_like(t) for t in outs_fn]
    for a, b in zip(outs_fn, outs_op):
        assert torch.equal(a, b) and a.stride() == b.stride()
    for a, b in zip(torch.autograd.grad(outs_fn, (q, k), grads),
                    torch.autograd.grad(outs_op, (q, k), grads)):
        assert torch.equal(a, b)


def test_torch_override_knob(monkeypatch):
    q, k = _heads(1, 2, 3, 8, torch.float32, True), _heads(1, 1, 3, 8, torch.float32, True)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    monkeypatch.setattr(R, "use_triton", lambda *tensors: True)   # as on CUDA
    monkeypatch.setenv("SLOTH_KERNEL_ROPE", "torch")
    monkeypatch.setattr(T, "_launch", lambda *a, **kw: pytest.fail("Triton path taken"))
    for got, want in zip(apply_rope(q, k, cos, sin), apply_rope_reference(q, k, cos, sin)):
        assert torch.equal(got, want)


def test_other_unsqueeze_dim_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(R, "use_triton", lambda *tensors: True)   # as on CUDA
    monkeypatch.setattr(T, "_launch", lambda *a, **kw: pytest.fail("Triton path taken"))
    q, k = _heads(1, 2, 3, 8, torch.float32, False), _heads(1, 2, 3, 8, torch.float32, False)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, S, H, D] with S=3
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    assert T.supported(q, k, cos, sin, unsqueeze_dim=2) is not None
    for got, want in zip(apply_rope(q, k, cos, sin, unsqueeze_dim=2),
                         apply_rope_reference(q, k, cos, sin, unsqueeze_dim=2)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_opcheck():
    q, k = _heads(1, 4, 3, 8, torch.float32, True), _heads(1, 2, 3, 8, torch.float32, False)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    torch.library.opcheck(_rope_fwd, (q, k, cos, sin))


def test_compiles_without_graph_breaks():
    q, k = _heads(1, 4, 3, 8, torch.float32, True), _heads(1, 2, 3, 8, torch.float32, True)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)

    def fn(q, k):
        q_out, k_out = apply_rope_triton(q, k, cos, sin)
        return q_out.sum() + 2 * k_out.sum()

    loss = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k)
    got = torch.autograd.grad(loss, (q, k))
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin)
    want = torch.autograd.grad(q_ref.sum() + 2 * k_ref.sum(), (q, k))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


# ----------------------------------------------------------------------------- GPU (H200)

def _rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rot", [128, 64], ids=["full_rotary", "partial_rotary"])
@pytest.mark.parametrize("grad_layout", ["like_output", "contiguous"])
def test_gpu_matches_fp32_reference(dtype, rot, grad_layout):
    batch, n_q, n_k, seq, dim = 2, 32, 8, 4096, 128
    q = _heads(batch, n_q, seq, dim, dtype, True, device="cuda")
    k = _heads(batch, n_k, seq, dim, dtype, True, device="cuda")
    cos, sin = _cos_sin(1, seq, rot, dtype, device="cuda", base=500000.0)
    q_out, k_out = apply_rope(q, k, cos, sin)  # public entry point: CUDA takes the Triton path
    assert q_out.stride() == q.stride()
    if grad_layout == "like_output":
        gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    else:  # [B, H, S, D] contiguous, as eager attention's backward returns them
        gq, gk = torch.randn(q_out.shape, device="cuda", dtype=dtype), torch.randn(
            k_out.shape, device="cuda", dtype=dtype)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (gq, gk))

    q32 = q.detach().float().requires_grad_()
    k32 = k.detach().float().requires_grad_()
    q_ref, k_ref = apply_rope_reference(q32, k32, cos.float(), sin.float())
    dq_ref, dk_ref = torch.autograd.grad((q_ref, k_ref), (q32, k32), (gq.float(), gk.float()))
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in [(q_out, q_ref), (k_out, k_ref), (dq, dq_ref), (dk, dk_ref)]:
        assert torch.isfinite(got).all()
        assert _rel_err(got, want) <= bound


@pytest.mark.gpu
def test_gpu_inductor():
    q = _heads(1, 32, 1024, 128, torch.bfloat16, True, device="cuda")
    k = _heads(1, 8, 1024, 128, torch.bfloat16, True, device="cuda")
    cos, sin = _cos_sin(1, 1024, 128, torch.bfloat16, device="cuda")
    compiled = torch.compile(lambda a, b: apply_rope(a, b, cos, sin), fullgraph=True)
    q_out, k_out = compiled(q, k)
    dq, dk = torch.autograd.grad((q_out.float().sum() + k_out.float().square().sum()), (q, k))
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    q_ref, k_ref = apply_rope_reference(q32, k32, cos.float(), sin.float())
    dq_ref, dk_ref = torch.autograd.grad(q_ref.sum() + k_ref.square().sum(), (q32, k32))
    for got, want in [(q_out, q_ref), (k_out, k_ref), (dq, dq_ref), (dk, dk_ref)]:
        assert _rel_err(got, want) <= 1e-2
