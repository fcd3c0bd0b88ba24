"""Fused LoRA Functions vs their plain-autograd references (PEFT's lora.Linear math).

CPU: fp32 tight, fp16 loose, dense and 4-bit base weights, mixed LoRA/activation dtypes, and
the Triton pieces (4-bit dequant, in-place activation backward) under the interpreter, both
directly and through the Functions' CUDA dispatch. GPU: bf16 at Llama-3-8B layer shapes.
"""
import pytest
import torch
import torch.nn.functional as F

from sloth_plugins.kernels import lora as L
from sloth_plugins.kernels.nf4 import QuantState4bit, dequantize_4bit_reference

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-2, atol=2e-2)}



def _proj(out_f, in_f, dtype, lora_dtype=None, r=4, bias=False, lora=True, quant=None, device="cpu"):
    """A projection with fresh random weights; ``quant`` in (None, 'nf4', 'fp4')."""
    lora_dtype = lora_dtype or dtype
    w = torch.randn(out_f, in_f, device=device) / in_f ** 0.5
    weight, state = w.to(dtype), None
    if quant is not None:
        import bitsandbytes.functional as bnbf
        weight, qs = bnbf.quantize_4bit(w.to(dtype), blocksize=64, compress_statistics=True, quant_type=quant)
        state = QuantState4bit.from_bnb(qs)
    A = B = b = None
    if lora:
        A = (torch.randn(r, in_f, device=device) / in_f ** 0.5).to(lora_dtype).requires_grad_()
        B = (torch.randn(out_f, r, device=device) / r ** 0.5).to(lora_dtype).requires_grad_()
    if bias:
        b = (torch.randn(out_f, device=device) * 0.1).to(dtype).requires_grad_()
    return L.LoraProjection(weight, A, B, 0.75, b, state)


def _leaves(x, projs):
    return [x] + [t for p in projs for t in (p.A, p.B, p.bias) if t is not None]


def _close(got, want, tol):
    """assert_close with atol scaled to the tensor's magnitude: gradients are sums over tokens with
    cancellation, so an element much smaller than its neighbours carries their rounding error."""
    scale = want.detach().abs().max().float().clamp(min=1).item()
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _compare(fused_fn, ref_fn, leaves, tol, seed=0):
    out, ref = fused_fn(), ref_fn()
    out = out if isinstance(out, tuple) else (out,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    g = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(r.shape, generator=g).to(r.device, r.dtype) for r in ref]
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape and torch.isfinite(o).all()
        _close(o, r, tol)
    got = torch.autograd.grad(out, leaves, grads_out)
    want = torch.autograd.grad(ref, leaves, grads_out)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.isfinite(a).all()
        _close(a, b, tol)


DTYPE_CASES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32),
               (torch.float32, torch.float16)]


@pytest.mark.parametrize("dtype,lora_dtype", DTYPE_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear(dtype, lora_dtype, bias):
    x = torch.randn(2, 8, 32, dtype=dtype, requires_grad=True)
    p = _proj(48, 32, dtype, lora_dtype, bias=bias)
    _compare(lambda: L.lora_linear(x, p.weight, p.A, p.B, p.scale, p.bias),
             lambda: L.lora_linear_reference(x, p.weight, p.A, p.B, p.scale, p.bias),
             _leaves(x, [p]), TOL[min(dtype, lora_dtype, key=lambda d: torch.finfo(d).bits)])


@pytest.mark.parametrize("dtype,lora_dtype", DTYPE_CASES)
def test_lora_qkv_with_a_plain_projection(dtype, lora_dtype):
    x = torch.randn(3, 5, 32, dtype=dtype, requires_grad=True)
    q, k, v = _proj(32, 32, dtype, lora_dtype), _proj(16, 32, dtype, lora=False), _proj(16, 32, dtype, lora_dtype, r=8)
    _compare(lambda: L.lora_qkv(x, q, k, v), lambda: L.lora_qkv_reference(x, q, k, v),
             _leaves(x, [q, k, v]), TOL[min(dtype, lora_dtype, key=lambda d: torch.finfo(d).bits)])


@pytest.mark.parametrize("activation", L.ACTIVATIONS)
@pytest.mark.parametrize("dtype,lora_dtype", DTYPE_CASES[:3])
def test_lora_gated_mlp(activation, dtype, lora_dtype):
    x = torch.randn(2, 6, 32, dtype=dtype, requires_grad=True)
    gate, up = _proj(64, 32, dtype, lora_dtype), _proj(64, 32, dtype, lora_dtype)
    down = _proj(32, 64, dtype, lora_dtype)
    _compare(lambda: L.lora_gated_mlp(x, gate, up, down, activation),
             lambda: L.lora_gated_mlp_reference(x, gate, up, down, activation),
             _leaves(x, [gate, up, down]), TOL[min(dtype, lora_dtype, key=lambda d: torch.finfo(d).bits)])


def test_lora_gated_mlp_fused_gate_up_and_partial_lora():
    x = torch.randn(4, 32, requires_grad=True)
    gate_up, down = _proj(128, 32, torch.float32, bias=True), _proj(32, 64, torch.float32, lora=False)
    _compare(lambda: L.lora_gated_mlp(x, gate_up, None, down, "geglu"),
             lambda: L.lora_gated_mlp_reference(x, gate_up, None, down, "geglu"),
             _leaves(x, [gate_up, down]), TOL[torch.float32])


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_quantized_base_weights(quant):
    x = torch.randn(2, 4, 64, requires_grad=True)
    gate, up, down = (_proj(128, 64, torch.float32, quant=quant), _proj(128, 64, torch.float32, quant=quant),
                      _proj(64, 128, torch.float32, quant=quant))
    _compare(lambda: L.lora_gated_mlp(x, gate, up, down, "swiglu"),
             lambda: L.lora_gated_mlp_reference(x, gate, up, down, "swiglu"),
             _leaves(x, [gate, up, down]), TOL[torch.float32])
    plain = L.LoraProjection(gate.weight, quant=gate.quant)  # a 4-bit layer without LoRA
    _compare(lambda: L.lora_qkv(x, gate, up, plain), lambda: L.lora_qkv_reference(x, gate, up, plain),
             _leaves(x, [gate, up]), TOL[torch.float32])


def test_saves_only_inputs_rank_products_and_gate_up():
    """No dequantized or merged weight among the saved tensors: x, A, B, h = x Aᵀ, and for the MLP
    gate and up (plus the frozen weights, which are never saved, only referenced)."""
    tokens, hidden, inter, r = 16, 64, 128, 4
    x = torch.randn(tokens, hidden, requires_grad=True)
    gate, up, down = (_proj(inter, hidden, torch.float32, r=r, quant="nf4"), _proj(inter, hidden, torch.float32, r=r),
                      _proj(hidden, inter, torch.float32, r=r, quant="nf4"))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = L.lora_gated_mlp(x, gate, up, down, "swiglu")
    big = sorted(s for s in saved if len(s) == 2 and min(s) > r)
    assert big == sorted([(tokens, hidden), (tokens, inter), (tokens, inter)]), saved
    y.sum().backward()


def test_mlp_backward_twice_raises_instead_of_lying():
    x = torch.randn(4, 32, requires_grad=True)
    y = L.lora_gated_mlp(x, _proj(64, 32, torch.float32), _proj(64, 32, torch.float32), _proj(32, 64, torch.float32))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_frozen_inputs_get_no_grad_and_x_without_grad_works():
    x = torch.randn(4, 32)
    p = _proj(16, 32, torch.float32)
    p.B.requires_grad_(False)
    y = L.lora_linear(x, p.weight, p.A, p.B, p.scale)
    dA, = torch.autograd.grad(y.square().sum(), [p.A])
    want, = torch.autograd.grad(L.lora_linear_reference(x, p.weight, p.A, p.B, p.scale).square().sum(), [p.A])
    _close(dA, want, TOL[torch.float32])


# ----------------------------------------------------------------------------- Triton pieces

@pytest.mark.parametrize("activation", L.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fused_gate_up", [False, True])
def test_inplace_activation_backward_triton(activation, dtype, fused_gate_up):
    from sloth_plugins.kernels._lora_triton import gated_activation_backward_triton_
    rows, cols = 8, 96
    if fused_gate_up:
        gu = torch.randn(rows, 2 * cols).to(dtype) * 2
        g, u = gu.chunk(2, dim=-1)
    else:
        g, u = (torch.randn(rows, cols) * 2).to(dtype), torch.randn(rows, cols).to(dtype)
    da = torch.randn(rows, cols).to(dtype)
    a_ref, dg_ref, du_ref = L.gated_activation_backward_reference(g, u, da, activation)
    fwd = L.gated_activation(activation, g, u)
    returned = gated_activation_backward_triton_(g, u, da, activation)
    assert returned.data_ptr() == da.data_ptr()
    for got, want in ((da, a_ref), (g, dg_ref), (u, du_ref)):
        assert torch.isfinite(got).all()
        _close(got, want, TOL[dtype])
    _close(da, fwd, TOL[dtype])  # recomputed a equals the forward's


@pytest.mark.parametrize("activation", L.ACTIVATIONS)
def test_activation_backward_reference_matches_autograd(activation):
    g = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    da = torch.randn(6, 40, dtype=torch.float64)
    out = (F.silu(g) if activation == "swiglu" else
           F.gelu(g, approximate="tanh" if activation == "geglu_tanh" else "none")) * u
    dg, du = torch.autograd.grad(out, [g, u], da)
    a_ref, dg_ref, du_ref = L.gated_activation_backward_reference(g.detach(), u.detach(), da, activation)
    torch.testing.assert_close(a_ref, out.detach())
    torch.testing.assert_close(dg_ref, dg)
    torch.testing.assert_close(du_ref, du)


def test_cuda_dispatch_path_under_interpreter(monkeypatch):
    """Force the Functions down their Triton branch (dequant, activation fwd/bwd) on CPU tensors."""
    import sloth_plugins.kernels.activations as acts
    import sloth_plugins.kernels.nf4 as nf4
    for module in (L, nf4, acts):
        monkeypatch.setattr(module, "use_triton", lambda *tensors: True)
    x = torch.randn(2, 4, 64, requires_grad=True)
    gate, up, down = (_proj(128, 64, torch.float32, quant="nf4"), _proj(128, 64, torch.float32, quant="fp4"),
                      _proj(64, 128, torch.float32, quant="nf4", bias=True))
    # Triton's erf/sigmoid differ from torch's in the last bits; 1 + erf(g) cancels for g << 0.
    for activation in L.ACTIVATIONS:
        _compare(lambda: L.lora_gated_mlp(x, gate, up, down, activation),
                 lambda: L.lora_gated_mlp_reference(x, gate, up, down, activation),
                 _leaves(x, [gate, up, down]), dict(rtol=1e-4, atol=1e-4))
    y = L.lora_gated_mlp(x, gate, up, down, "swiglu")
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):  # the Triton write bumped the saved tensors' versions
        y.sum().backward()


def test_dequantized_weights_are_reused_only_while_the_buffer_still_holds_them(monkeypatch):
    """Per-role buffers: a layer's backward right after its forward skips the dequant; anything
    that changed the buffer's contents (another weight, an in-place write, a new tensor) does not."""
    import sloth_plugins.kernels.nf4 as nf4
    nf4.clear_dequant_buffers()
    calls = []
    real = nf4.dequantize_4bit_reference
    monkeypatch.setattr(nf4, "dequantize_4bit_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    first, second = _proj(128, 64, torch.float32, quant="nf4"), _proj(128, 64, torch.float32, quant="nf4")
    want = real(first.weight, first.quant, torch.float32)
    for expected_calls in (1, 1):
        got = nf4.dequantize_4bit(first.weight, first.quant, torch.float32, reuse_buffer=True, slot="a")
        assert len(calls) == expected_calls and torch.equal(got, want)
    nf4.dequantize_4bit(second.weight, second.quant, torch.float32, reuse_buffer=True, slot="a")
    got = nf4.dequantize_4bit(first.weight, first.quant, torch.float32, reuse_buffer=True, slot="a")
    assert len(calls) == 3 and torch.equal(got, want)
    nf4.dequantize_4bit(first.weight, first.quant, torch.float32, reuse_buffer=True, slot="b")
    assert len(calls) == 4                                 # another role: its own buffer
    first.weight.view(torch.uint8).bitwise_xor_(0x11)      # in place: the version counter moves
    got = nf4.dequantize_4bit(first.weight, first.quant, torch.float32, reuse_buffer=True, slot="a")
    assert len(calls) == 5 and torch.equal(got, real(first.weight, first.quant, torch.float32))
    copy = first.weight.clone()                            # equal bytes, another tensor
    nf4.dequantize_4bit(copy, first.quant, torch.float32, reuse_buffer=True, slot="a")
    assert len(calls) == 6
    nf4.dequantize_4bit(copy.data, first.quant, torch.float32, reuse_buffer=True, slot="a")
    assert len(calls) == 6                                 # a fresh .data view of the same bytes: a hit
    nf4.clear_dequant_buffers()


def test_stacked_quantized_layers_share_role_buffers_and_stay_exact():
    """Two 4-bit MLPs and QKV blocks in a row use the same role buffers: the backward of the
    first layer must dequantize its own weights again, not reuse the second layer's."""
    x = torch.randn(2, 4, 64, requires_grad=True)
    layers = [[_proj(128, 64, torch.float32, quant="nf4"), _proj(128, 64, torch.float32, quant="nf4"),
               _proj(64, 128, torch.float32, quant="nf4")] for _ in range(2)]
    qkv = [[_proj(64, 64, torch.float32, quant="nf4"), _proj(32, 64, torch.float32, quant="nf4"),
            _proj(32, 64, torch.float32, quant="nf4")] for _ in range(2)]

    def run(mlp, attn):
        h = x
        for (gate, up, down), (q, k, v) in zip(layers, qkv):
            a, b, c = attn(h, q, k, v)
            h = mlp(h + a + torch.cat([b, c], -1).repeat(1, 1, 1), gate, up, down)
        return h

    leaves = _leaves(x, [p for layer in layers + qkv for p in layer])
    _compare(lambda: run(lambda h, g, u, d: L.lora_gated_mlp(h, g, u, d, "swiglu"), L.lora_qkv),
             lambda: run(lambda h, g, u, d: L.lora_gated_mlp_reference(h, g, u, d, "swiglu"), L.lora_qkv_reference),
             leaves, dict(rtol=1e-5, atol=1e-5))


def test_input_validation():
    x = torch.randn(4, 32)
    p = _proj(16, 32, torch.float32)
    with pytest.raises(ValueError):
        L.lora_linear(torch.randn(4, 31), p.weight, p.A, p.B, 1.0)
    with pytest.raises(ValueError):
        L.lora_linear(x, p.weight, p.A, None, 1.0)
    with pytest.raises(ValueError):
        L.lora_gated_mlp(x, p, p, _proj(32, 16, torch.float32), "relu")
    with pytest.raises(ValueError):
        L.lora_gated_mlp(x, p, p, _proj(32, 64, torch.float32), "swiglu")


# ----------------------------------------------------------------------------- GPU, 8B shapes

def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _gpu_check(fused_fn, ref_fn, leaves, tol=1e-2):
    """bf16 fused vs the same computation in fp32 (the reference on fp32 copies of every leaf)."""
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    out = fused_fn(leaves)
    ref = ref_fn(ref_leaves)
    out = out if isinstance(out, tuple) else (out,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    grads_out = [torch.randn_like(r) for r in ref]
    for o, r in zip(out, ref):
        assert torch.isfinite(o).all() and _rel_err(o, r) <= tol, _rel_err(o, r)
    got = torch.autograd.grad(out, leaves, [g.to(o.dtype) for g, o in zip(grads_out, out)])
    want = torch.autograd.grad(ref, ref_leaves, grads_out)
    for leaf, a, b in zip(leaves, got, want):
        assert a.dtype == leaf.dtype
        assert torch.isfinite(a).all() and _rel_err(a, b) <= tol, _rel_err(a, b)


def _gpu_proj(out_f, in_f, quant=None, lora_dtype=torch.bfloat16):
    p = _proj(out_f, in_f, torch.bfloat16, lora_dtype, r=16, quant=quant, device="cuda")
    with torch.no_grad():  # PEFT initialises B to zero; a trained-looking B exercises every path
        p.B.mul_(0.5)
    return p


def _as_fp32(p, A, B):
    weight = p.weight if p.quant is None else dequantize_4bit_reference(p.weight, p.quant, torch.bfloat16)
    return L.LoraProjection(weight.float(), A, B, p.scale)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32])
def test_gpu_mlp_llama3_8b_shapes(quant, lora_dtype):
    torch.manual_seed(0)
    tokens, hidden, inter = 4096, 4096, 14336
    gate, up, down = (_gpu_proj(inter, hidden, quant, lora_dtype), _gpu_proj(inter, hidden, quant, lora_dtype),
                      _gpu_proj(hidden, inter, quant, lora_dtype))
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    leaves = [x, gate.A, gate.B, up.A, up.B, down.A, down.B]

    def fused(t):
        return L.lora_gated_mlp(t[0], L.LoraProjection(gate.weight, t[1], t[2], gate.scale, None, gate.quant),
                                L.LoraProjection(up.weight, t[3], t[4], up.scale, None, up.quant),
                                L.LoraProjection(down.weight, t[5], t[6], down.scale, None, down.quant), "swiglu")

    def ref(t):
        return L.lora_gated_mlp_reference(t[0], _as_fp32(gate, t[1], t[2]), _as_fp32(up, t[3], t[4]),
                                          _as_fp32(down, t[5], t[6]), "swiglu")
    _gpu_check(fused, ref, leaves)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_gpu_qkv_and_o_llama3_8b_shapes(quant):
    torch.manual_seed(0)
    tokens, hidden, kv = 4096, 4096, 1024
    q, k, v, o = (_gpu_proj(hidden, hidden, quant), _gpu_proj(kv, hidden, quant), _gpu_proj(kv, hidden, quant),
                  _gpu_proj(hidden, hidden, quant))
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    projs = (q, k, v)
    leaves = [x] + [t for p in projs for t in (p.A, p.B)]

    def fused(t):
        return L.lora_qkv(t[0], *[L.LoraProjection(p.weight, t[1 + 2 * i], t[2 + 2 * i], p.scale, None, p.quant)
                                  for i, p in enumerate(projs)])

    def ref(t):
        return L.lora_qkv_reference(t[0], *[_as_fp32(p, t[1 + 2 * i], t[2 + 2 * i]) for i, p in enumerate(projs)])
    _gpu_check(fused, ref, leaves)
    _gpu_check(lambda t: L.lora_linear(t[0], o.weight, t[1], t[2], o.scale, quant_state=o.quant),
               lambda t: L.lora_projection_reference(t[0], _as_fp32(o, t[1], t[2])), [x, o.A, o.B])


@pytest.mark.gpu
@pytest.mark.parametrize("activation", L.ACTIVATIONS)
def test_gpu_inplace_activation_backward_bf16(activation):
    from sloth_plugins.kernels._lora_triton import gated_activation_backward_triton_
    gu = torch.randn(512, 2 * 14336, device="cuda", dtype=torch.bfloat16) * 2
    g, u = gu.chunk(2, dim=-1)
    da = torch.randn(512, 14336, device="cuda", dtype=torch.bfloat16)
    want = L.gated_activation_backward_reference(g, u, da, activation)
    gated_activation_backward_triton_(g, u, da, activation)
    for got, ref in zip((da, g, u), want):
        assert _rel_err(got, ref) <= 1e-2


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_lora_dtype_casts_inside_and_returns_grads_in_the_parameters_dtype(quant):
    """fp32 adapters run as fp16 (what autocast does): the same numbers as casting them first
    with autograd, and dA, dB come back fp32 (no cast node of ours in the graph)."""
    x = torch.randn(2, 8, 64, dtype=torch.float16, requires_grad=True)
    q, k = _proj(48, 64, torch.float16, torch.float32, quant=quant), _proj(16, 64, torch.float16, torch.float32)
    gate, up, down = (_proj(96, 64, torch.float16, torch.float32, quant=quant),
                      _proj(96, 64, torch.float16, torch.float32), _proj(64, 96, torch.float16, torch.float32))

    def cast(p):
        return L.LoraProjection(p.weight, p.A.half(), p.B.half(), p.scale, p.bias, p.quant)

    leaves = _leaves(x, [q, k, gate, up, down])
    _compare(lambda: L.lora_projections(x, [q, k], lora_dtype=torch.float16),
             lambda: L.lora_projections(x, [cast(q), cast(k)]), _leaves(x, [q, k]), TOL[torch.float16])
    _compare(lambda: L.lora_gated_mlp(x, gate, up, down, "swiglu", lora_dtype=torch.float16),
             lambda: L.lora_gated_mlp(x, cast(gate), cast(up), cast(down), "swiglu"), leaves[:1] + leaves[5:],
             TOL[torch.float16])
    out = L.lora_projections(x, [q], lora_dtype=torch.float16)[0]
    nodes, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in nodes:
            nodes.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    assert "_LoraProjectionsFnBackward" in nodes and not any("ToCopy" in n for n in nodes), nodes
    dA, dB = torch.autograd.grad(out.float().sum(), [q.A, q.B])
    assert dA.dtype == dB.dtype == torch.float32
