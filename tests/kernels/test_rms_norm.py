"""Triton RMSNorm vs the torch reference: CPU under the interpreter, real shapes on the GPU."""
import importlib

import pytest
import torch

from sloth_plugins.kernels import _rms_norm_triton as T
from sloth_plugins.kernels._dispatch import eager_call
from sloth_plugins.kernels._rms_norm_triton import _rms_norm_fwd, rms_norm_triton
from sloth_plugins.kernels.rms_norm import rms_norm, rms_norm_reference

R = importlib.import_module("sloth_plugins.kernels.rms_norm")   # the package's rms_norm is the function

LLAMA = dict(offset=0.0, cast_before_weight=True)
GEMMA = dict(offset=1.0, cast_before_weight=False)
FLAVOURS = pytest.mark.parametrize("flavour", [LLAMA, GEMMA], ids=["llama", "gemma"])
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
EPS = 1e-6



def _weight(n, dtype, trainable, device="cpu"):
    return (torch.randn(n, device=device) * 0.5).to(dtype).requires_grad_(trainable)


def _grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t.requires_grad]
    return torch.autograd.grad(out, wanted, grad_out)


def _check(x, weight, flavour, tol):
    x_before = x.detach().clone()
    y = rms_norm_triton(x, weight, EPS, **flavour)
    y_ref = rms_norm_reference(x, weight, EPS, **flavour)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, **tol)
    grad_out = torch.randn_like(y_ref)
    got = _grads(y, (x, weight), grad_out)
    want = _grads(y_ref, (x, weight), grad_out)
    assert len(got) == (1 + weight.requires_grad)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **tol)
    assert torch.equal(x.detach(), x_before), "the kernel modified its input"


@FLAVOURS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("trainable", [True, False], ids=["weight_trained", "weight_frozen"])
def test_matches_reference(dtype, flavour, trainable):
    x = torch.randn(3, 5, 96, dtype=dtype, requires_grad=True)
    _check(x, _weight(96, dtype, trainable), flavour, TOL[dtype])


@FLAVOURS
def test_fp32_weight_on_half_input_promotes_like_reference(flavour):
    x = torch.randn(7, 64, dtype=torch.float16, requires_grad=True)
    _check(x, _weight(64, torch.float32, True), flavour, TOL[torch.float16])


@pytest.mark.parametrize("layout", ["row_slice", "transposed", "single_row"])
def test_non_contiguous_and_odd_shapes(layout):
    if layout == "row_slice":  # rows strided in memory, last dim dense
        x = torch.randn(6, 160)[:, 16:144].requires_grad_()
    elif layout == "transposed":  # last dim not stride 1
        x = torch.randn(40, 5).t().requires_grad_()
    else:
        x = torch.randn(33, requires_grad=True)
    _check(x, _weight(x.shape[-1], torch.float32, True), LLAMA, TOL[torch.float32])


def test_llama_flavour_with_offset():
    x = torch.randn(4, 48, dtype=torch.float16, requires_grad=True)
    _check(x, _weight(48, torch.float16, True), dict(offset=1.0, cast_before_weight=True),
           TOL[torch.float16])


def test_more_rows_than_backward_programs():
    # the dW reduction sums several partials, each over a block of rows with a ragged tail
    x = torch.randn(23, 32, requires_grad=True)
    _check(x, _weight(32, torch.float32, True), GEMMA, TOL[torch.float32])


@FLAVOURS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_grad_tiles_with_ragged_rows_and_columns(dtype, flavour):
    # the dW reduction: several column blocks (the last one partial), several row splits (the
    # last one partial), several row tiles per split
    rows, cols = 37, 80
    block_m, block_n, rows_per_split, n_splits, _ = T._dw_launch(rows, cols, 4, False)
    assert cols > block_n and cols % block_n != 0
    assert n_splits > 1 and rows % rows_per_split != 0 and rows_per_split > block_m
    x = torch.randn(rows, cols, dtype=dtype, requires_grad=True)
    _check(x, _weight(cols, dtype, True), flavour, TOL[dtype])


@FLAVOURS
def test_custom_op_and_eager_function_agree(flavour):
    # eager calls take the autograd.Function, traced ones the custom op: same launches, same bits
    x = torch.randn(6, 40, requires_grad=True)
    w = _weight(40, torch.float32, True)
    args = (EPS, flavour["offset"], flavour["cast_before_weight"])
    y_fn, y_op = rms_norm_triton(x, w, EPS, **flavour), _rms_norm_fwd(x, w, *args)
    grad_out = torch.randn_like(y_fn)
    assert torch.equal(y_fn, y_op)
    for a, b in zip(_grads(y_fn, (x, w), grad_out), _grads(y_op, (x, w), grad_out)):
        assert torch.equal(a, b)


def test_eager_call_only_for_plain_tensors_outside_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode
    plain, param = torch.randn(2, 4), torch.nn.Parameter(torch.randn(4))
    assert eager_call(plain, param)
    with FakeTensorMode():
        fake = torch.randn(2, 4)
    assert not eager_call(fake, param)
    seen = []

    def fn(t):
        seen.append(eager_call(t))
        return t * 2

    torch.compile(fn, backend="eager", fullgraph=True)(plain)
    assert seen == [False]


def test_torch_override_knob(monkeypatch):
    x, w = torch.randn(3, 16, requires_grad=True), _weight(16, torch.float32, True)
    monkeypatch.setattr(R, "use_triton", lambda *tensors: True)   # as on CUDA
    monkeypatch.setenv("SLOTH_KERNEL_RMS_NORM", "torch")
    called = []
    monkeypatch.setattr(T, "_forward", lambda *a: called.append(a))
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS))
    assert not called
    monkeypatch.setenv("SLOTH_KERNEL_RMS_NORM", "cuda")
    with pytest.raises(ValueError, match="SLOTH_KERNEL_RMS_NORM"):
        rms_norm(x, w, EPS)


def test_unsupported_inputs_take_the_reference(monkeypatch):
    monkeypatch.setattr(R, "use_triton", lambda *tensors: True)   # as on CUDA
    monkeypatch.setattr(T, "_forward", lambda *a: pytest.fail("Triton path taken"))
    monkeypatch.setattr(T, "MAX_HIDDEN", 8)
    x, w = torch.randn(3, 16), _weight(16, torch.float32, False)
    assert T.supported(x, w) is not None
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS))
    x, w = torch.randn(3, 4), _weight(1, torch.float32, False)          # a broadcast weight
    assert T.supported(x, w) is not None
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS))


def test_zero_rows():
    x = torch.randn(0, 32, requires_grad=True)
    w = _weight(32, torch.float32, True)
    y = rms_norm_triton(x, w, EPS)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(32))


def test_opcheck():
    x = torch.randn(4, 32, requires_grad=True)
    w = _weight(32, torch.float32, True)
    torch.library.opcheck(_rms_norm_fwd, (x, w, EPS, 1.0, False))


def test_compiles_without_graph_breaks():
    x = torch.randn(4, 32, requires_grad=True)
    w = _weight(32, torch.float32, True)
    compiled = torch.compile(lambda a, b: rms_norm_triton(a, b, EPS, **GEMMA) * 2,
                             backend="aot_eager", fullgraph=True)
    y = compiled(x, w)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    dx_ref, dw_ref = torch.autograd.grad((rms_norm_reference(x, w, EPS, **GEMMA) * 2).sum(), (x, w))
    torch.testing.assert_close(y, rms_norm_reference(x, w, EPS, **GEMMA) * 2, **TOL[torch.float32])
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float32])
    torch.testing.assert_close(dw, dw_ref, **TOL[torch.float32])


# ----------------------------------------------------------------------------- GPU (H200)

def _rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.gpu
@FLAVOURS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,hidden", [(32768, 2048), (8192, 4096), (4096, 8192), (512, 16384),
                                         (1000, 3000)])
def test_gpu_matches_fp32_reference(dtype, flavour, rows, hidden):
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
    w = _weight(hidden, dtype, True, device="cuda")
    y = rms_norm(x, w, EPS, **flavour)  # public entry point: CUDA takes the Triton path
    grad_out = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), grad_out)

    x32 = x.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    y_ref = rms_norm_reference(x32, w32, EPS, **flavour)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x32, w32), grad_out.float())
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == rms_norm_reference(x[:1], w, EPS, **flavour).dtype
    for got, want in [(y, y_ref), (dx, dx_ref), (dw, dw_ref)]:
        assert torch.isfinite(got).all()
        assert _rel_err(got, want) <= bound


@pytest.mark.gpu
def test_gpu_frozen_weight_and_inductor():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = _weight(4096, torch.bfloat16, False, device="cuda")
    compiled = torch.compile(lambda a, b: rms_norm(a, b, EPS, **LLAMA), fullgraph=True)
    y = compiled(x, w)
    grad_out = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, (x,), grad_out)
    x32 = x.detach().float().requires_grad_()
    y_ref = rms_norm_reference(x32, w.float(), EPS, **LLAMA)
    (dx_ref,) = torch.autograd.grad(y_ref, (x32,), grad_out.float())
    assert w.grad is None
    assert _rel_err(y, y_ref) <= 1e-2 and _rel_err(dx, dx_ref) <= 1e-2


@pytest.mark.gpu
@FLAVOURS
def test_gpu_trained_weight_eager_and_inductor_agree(flavour):
    x = torch.randn(4, 1024, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = _weight(4096, torch.bfloat16, True, device="cuda")
    grad_out = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16)
    eager = torch.autograd.grad(rms_norm(x, w, EPS, **flavour), (x, w), grad_out)
    compiled = torch.compile(lambda a, b: rms_norm(a, b, EPS, **flavour), fullgraph=True)
    traced = torch.autograd.grad(compiled(x, w), (x, w), grad_out)
    for a, b in zip(eager, traced):  # the same launches on the same inputs
        assert torch.isfinite(a).all()
        assert _rel_err(a, b) <= 1e-6
