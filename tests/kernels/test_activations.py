"""Triton SwiGLU / GeGLU vs the torch reference: CPU under the interpreter, real shapes on GPU."""
import pytest
import torch

from sloth_plugins.kernels import _activations_triton as T
from sloth_plugins.kernels import activations as A
from sloth_plugins.kernels._activations_triton import _gated_fwd, geglu_triton, swiglu_triton
from sloth_plugins.kernels.activations import geglu, geglu_reference, swiglu, swiglu_reference

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}

KINDS = {  # name: (Triton function, reference, public dispatching function)
    "swiglu": (swiglu_triton, swiglu_reference, swiglu),
    "geglu_erf": (lambda g, u: geglu_triton(g, u, "none"),
                  lambda g, u: geglu_reference(g, u, "none"),
                  lambda g, u: geglu(g, u, "none")),
    "geglu_tanh": (lambda g, u: geglu_triton(g, u, "tanh"),
                   lambda g, u: geglu_reference(g, u, "tanh"),
                   lambda g, u: geglu(g, u, "tanh")),
}
PER_KIND = pytest.mark.parametrize("kind", list(KINDS))



def _check(kind, gate, up, tol, leaves=None):
    leaves = leaves or (gate, up)
    fast, reference, _ = KINDS[kind]
    before = [t.detach().clone() for t in leaves]
    out, out_ref = fast(gate, up), reference(gate, up)
    assert out.dtype == out_ref.dtype and out.shape == out_ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_ref, **tol)
    grad_out = torch.randn_like(out_ref)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(out_ref, leaves, grad_out)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **tol)
    assert all(torch.equal(t.detach(), b) for t, b in zip(leaves, before))


@PER_KIND
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(kind, dtype):
    # scale 3 reaches both tails of the activations
    gate = (torch.randn(3, 5, 70) * 3).to(dtype).requires_grad_()
    up = torch.randn(3, 5, 70, dtype=dtype, requires_grad=True)
    _check(kind, gate, up, TOL[dtype])


@PER_KIND
def test_chunks_of_fused_gate_up_projection(kind):
    # Phi-3 style gate_up.chunk(2, dim=-1): both halves are row-strided views of one tensor
    gate_up = (torch.randn(2, 6, 2 * 40) * 2).requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    _check(kind, gate, up, TOL[torch.float32], leaves=(gate_up,))


def test_transposed_inputs_and_wide_rows():
    # last dim not stride 1, and a row wider than one block (several programs per row)
    gate = torch.randn(2100, 3).t().requires_grad_()
    up = torch.randn(3, 2100, requires_grad=True)
    _check("swiglu", gate, up, TOL[torch.float32])


# the interpreter's numpy warns when exp overflows to inf, which the formulas handle
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_extreme_gate_values_stay_finite():
    gate = torch.tensor([[-100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0, 5.0]], requires_grad=True)
    up = torch.randn(1, 8, requires_grad=True)
    for kind in KINDS:
        _check(kind, gate, up, TOL[torch.float32])


def test_frozen_up_gets_no_grad():
    gate = torch.randn(4, 16, requires_grad=True)
    up = torch.randn(4, 16)
    swiglu_triton(gate, up).sum().backward()
    (dgate,) = torch.autograd.grad(swiglu_reference(gate, up).sum(), (gate,))
    torch.testing.assert_close(gate.grad, dgate, **TOL[torch.float32])
    assert up.grad is None


def test_bad_approximate_is_an_error():
    with pytest.raises(ValueError, match="approximate"):
        geglu_triton(torch.randn(2, 4), torch.randn(2, 4), "sigmoid")


@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh"])
def test_custom_op_and_eager_function_agree(kind):
    # eager calls take the autograd.Function, traced ones the custom op: same launches, same bits
    gate, up = torch.randn(4, 24, requires_grad=True), torch.randn(4, 24, requires_grad=True)
    out_fn, out_op = T._gated(gate, up, kind), _gated_fwd(gate, up, kind)
    grad_out = torch.randn_like(out_fn)
    assert torch.equal(out_fn, out_op)
    for a, b in zip(torch.autograd.grad(out_fn, (gate, up), grad_out),
                    torch.autograd.grad(out_op, (gate, up), grad_out)):
        assert torch.equal(a, b)


def test_torch_override_knob(monkeypatch):
    gate, up = torch.randn(3, 16), torch.randn(3, 16)
    monkeypatch.setattr(A, "use_triton", lambda *tensors: True)   # as on CUDA
    monkeypatch.setenv("SLOTH_KERNEL_MLP", "torch")
    monkeypatch.setattr(T, "_gated", lambda *a: pytest.fail("Triton path taken"))
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))
    assert torch.equal(geglu(gate, up, "tanh"), geglu_reference(gate, up, "tanh"))


def test_unsupported_inputs_take_the_reference(monkeypatch):
    monkeypatch.setattr(A, "use_triton", lambda *tensors: True)   # as on CUDA
    monkeypatch.setattr(T, "_gated", lambda *a: pytest.fail("Triton path taken"))
    gate, up = torch.randn(3, 16), torch.randn(16)                # broadcasting
    assert T.supported(gate, up) is not None
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))
    assert T.supported(torch.tensor(1.0), torch.tensor(2.0)) is not None
    assert torch.equal(geglu(torch.tensor(1.0), torch.tensor(2.0)), geglu_reference(torch.tensor(1.0), torch.tensor(2.0)))


def test_deprecated_gated_act_variable(monkeypatch):
    """SLOTH_KERNEL_GATED_ACT, the old name of SLOTH_KERNEL_MLP, still works and warns once."""
    import warnings

    from sloth_plugins.kernels import _dispatch
    monkeypatch.setattr(_dispatch, "_warned_deprecated", set())
    monkeypatch.delenv("SLOTH_KERNEL_MLP", raising=False)
    monkeypatch.setenv("SLOTH_KERNEL_GATED_ACT", "torch")
    with pytest.warns(DeprecationWarning, match="SLOTH_KERNEL_MLP"):
        assert _dispatch.kernel_choice("mlp") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.use_reference("mlp")
    monkeypatch.setenv("SLOTH_KERNEL_MLP", "triton")   # the new name wins
    assert _dispatch.kernel_choice("mlp") == "triton"
    monkeypatch.delenv("SLOTH_KERNEL_MLP")
    monkeypatch.setenv("SLOTH_KERNEL_GATED_ACT", "cuda")
    with pytest.raises(ValueError, match="SLOTH_KERNEL_GATED_ACT"):
        _dispatch.kernel_choice("mlp")


def test_opcheck():
    gate, up = torch.randn(4, 24, requires_grad=True), torch.randn(4, 24, requires_grad=True)
    for kind in ("silu", "gelu", "gelu_tanh"):
        torch.library.opcheck(_gated_fwd, (gate, up, kind))


@pytest.mark.parametrize("choice, custom_op_traced", [("auto", False), ("triton", True), ("torch", False)])
def test_compiles_without_graph_breaks(monkeypatch, choice, custom_op_traced):
    """Under torch.compile 'auto' hands inductor the reference (measured at least as fast as ours
    there); 'triton' keeps our kernel as a custom op. Both trace without a graph break."""
    monkeypatch.setenv("SLOTH_KERNEL_MLP", choice)
    monkeypatch.setattr(A, "use_triton", lambda *tensors: True)   # as on CUDA
    gate, up = torch.randn(4, 24, requires_grad=True), torch.randn(4, 24, requires_grad=True)
    def fn(g, u):
        return (swiglu(g, u) + geglu(g, u, "tanh")).square().sum()

    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    torch._dynamo.reset()
    loss = torch.compile(fn, backend=backend, fullgraph=True)(gate, up)
    assert any("gated_act_fwd" in t for t in traced) == custom_op_traced, traced
    got = torch.autograd.grad(loss, (gate, up))
    loss_ref = (swiglu_reference(gate, up) + geglu_reference(gate, up, "tanh")).square().sum()
    want = torch.autograd.grad(loss_ref, (gate, up))
    torch.testing.assert_close(loss, loss_ref, **TOL[torch.float32])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


# ----------------------------------------------------------------------------- GPU (H200)

def _rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.gpu
@PER_KIND
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_fp32_reference(kind, dtype):
    _, reference, public = KINDS[kind]
    tokens, intermediate = 4096, 14336
    gate = torch.randn(tokens, intermediate, device="cuda", dtype=dtype, requires_grad=True)
    up = torch.randn(tokens, intermediate, device="cuda", dtype=dtype, requires_grad=True)
    out = public(gate, up)  # public entry point: CUDA takes the Triton path
    grad_out = torch.randn_like(out)
    d_gate, d_up = torch.autograd.grad(out, (gate, up), grad_out)

    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    out_ref = reference(g32, u32)
    d_gate_ref, d_up_ref = torch.autograd.grad(out_ref, (g32, u32), grad_out.float())
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in [(out, out_ref), (d_gate, d_gate_ref), (d_up, d_up_ref)]:
        assert torch.isfinite(got).all()
        assert _rel_err(got, want) <= bound


@pytest.mark.gpu
def test_gpu_inductor_on_fused_gate_up():
    gate_up = torch.randn(2, 2048, 2 * 8192, device="cuda", dtype=torch.bfloat16,
                          requires_grad=True)

    def mlp_act(t):
        gate, up = t.chunk(2, dim=-1)
        return swiglu(gate, up)

    out = torch.compile(mlp_act, fullgraph=True)(gate_up)
    grad_out = torch.randn_like(out)
    (d_gate_up,) = torch.autograd.grad(out, (gate_up,), grad_out)
    ref_in = gate_up.detach().float().requires_grad_()
    out_ref = swiglu_reference(*ref_in.chunk(2, dim=-1))
    (d_ref,) = torch.autograd.grad(out_ref, (ref_in,), grad_out.float())
    assert _rel_err(out, out_ref) <= 1e-2 and _rel_err(d_gate_up, d_ref) <= 1e-2


def test_launch_settings_are_only_measured_on_cuda():
    from sloth_plugins.kernels._tuning import measured_choice
    calls = []
    pick = measured_choice(("test-cpu", 1), [(2048, 8), (4096, 8)], calls.append, torch.device("cpu"))
    assert pick == (2048, 8) and calls == []


@pytest.mark.parametrize("n_cols", [96, 14336])
def test_every_launch_setting_covers_the_row(n_cols):
    """Each candidate the tuner may pick computes the whole row (interpreter, small row count)."""
    gate, up = torch.randn(3, n_cols), torch.randn(3, n_cols)
    want = swiglu_reference(gate, up)
    for block, warps in T._launch_settings(n_cols):
        out = torch.full_like(gate, float("nan"))
        T._gated_fwd_kernel[(3, -(-n_cols // block))](gate, up, out, n_cols, n_cols, n_cols, n_cols,
                                                       KIND=0, BLOCK=block, num_warps=warps)
        torch.testing.assert_close(out, want, **TOL[torch.float32])


@pytest.mark.gpu
def test_gpu_tuner_picks_the_fastest_and_every_setting_is_bit_identical():
    from sloth_plugins.kernels._tuning import measured_choice
    cycles = {"slow": 2_000_000, "fast": 10_000, "medium": 500_000}
    pick = measured_choice(("test-gpu", 1), list(cycles), lambda c: torch.cuda._sleep(cycles[c]),
                           torch.device("cuda"))
    assert pick == "fast"
    assert measured_choice(("test-gpu", 1), list(cycles), lambda c: 1 / 0, torch.device("cuda")) == "fast"
    gate, up = (torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(gate)
    outs = []
    for block, warps in T._launch_settings(14336):
        out, dg, du = torch.empty_like(gate), torch.empty_like(gate), torch.empty_like(gate)
        grid = (gate.shape[0], -(-14336 // block))
        T._gated_fwd_kernel[grid](gate, up, out, 14336, 14336, 14336, 14336, KIND=0, BLOCK=block, num_warps=warps)
        T._gated_bwd_kernel[grid](do, gate, up, dg, du, 14336, 14336, 14336, 14336, 14336, 14336,
                                  KIND=0, BLOCK=block, num_warps=warps)
        outs.append((out, dg, du))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
