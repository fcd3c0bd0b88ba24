"""Fused linear cross-entropy.

CPU: the torch reference and ``chunked_cross_entropy`` against plain
``F.cross_entropy(hidden @ W.T)``; the Triton path under the interpreter against the reference.
GPU (``-m gpu``): the Triton path at real shapes against an fp32 reference.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from sloth_plugins.kernels import _cross_entropy_triton as ce_triton
from sloth_plugins.kernels import cross_entropy as ce

IGNORE = -100


# ----------------------------------------------------------------------------- helpers

def eager_loss(hidden, weight, labels, *, ignore_index=IGNORE, softcap=None, num_items_in_batch=None, **_):
    """The definition: full logits, F.cross_entropy summed, divided per HF's contract."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is None:
        return total / (labels != ignore_index).sum().clamp(min=1)
    return total / num_items_in_batch


def make_inputs(n, hidden_size, vocab, *, dtype=torch.float32, device="cpu", ignore_every=5, logit_std=1.0,
                all_ignored=False):
    hidden = torch.randn(n, hidden_size, dtype=dtype, device=device)
    weight = (torch.randn(vocab, hidden_size, device=device) * (logit_std / math.sqrt(hidden_size))).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=device)
    if all_ignored:
        labels.fill_(IGNORE)
    elif ignore_every:
        labels[1::ignore_every] = IGNORE
    return hidden, weight, labels


def run(fn, hidden, weight, labels, *, trainable=True, **kwargs):
    """Loss and gradients of fn on fresh leaves; grad of a frozen weight is None."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(trainable)
    loss = fn(h, w, labels, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def divisor_for(kind, labels, device="cpu"):
    n_valid = int((labels != IGNORE).sum())
    return {"none": None, "float": n_valid + 3.0, "int": n_valid + 3,
            "tensor": torch.tensor(float(n_valid + 3), device=device)}[kind]


def rel_err(actual, expected):
    assert actual is not None and expected is not None
    assert torch.isfinite(actual).all(), "non-finite values"
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


def assert_matches(result, expected, tol):
    loss, gh, gw = result
    loss_ref, gh_ref, gw_ref = expected
    assert torch.isfinite(loss)
    assert abs(float(loss) - float(loss_ref)) <= tol * abs(float(loss_ref)) + 1e-7
    assert rel_err(gh, gh_ref) <= tol
    if gw_ref is None:
        assert gw is None
    else:
        assert rel_err(gw, gw_ref) <= tol


# ----------------------------------------------------------------------------- CPU: reference

@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("divisor", ["none", "float", "int", "tensor"])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_reference_matches_eager(softcap, divisor, trainable, chunk_size):
    hidden, weight, labels = make_inputs(40, 24, 97, logit_std=2.0)
    kw = dict(softcap=softcap, num_items_in_batch=divisor_for(divisor, labels), trainable=trainable)
    expected = run(eager_loss, hidden, weight, labels, **kw)
    result = run(ce.fused_linear_cross_entropy_reference, hidden, weight, labels, chunk_size=chunk_size, **kw)
    assert_matches(result, expected, 1e-5)


def test_reference_3d_inputs_and_cpu_dispatch():
    hidden, weight, labels = make_inputs(2 * 13, 16, 50)
    hidden, labels = hidden.reshape(2, 13, 16), labels.reshape(2, 13)
    expected = run(eager_loss, hidden, weight, labels)
    assert_matches(run(ce.fused_linear_cross_entropy, hidden, weight, labels), expected, 1e-5)


@pytest.mark.parametrize("divisor", ["none", "tensor"])
def test_reference_all_ignored_is_zero(divisor):
    hidden, weight, labels = make_inputs(12, 8, 30, all_ignored=True)
    loss, gh, gw = run(ce.fused_linear_cross_entropy_reference, hidden, weight, labels,
                       num_items_in_batch=None if divisor == "none" else torch.tensor(5.0))
    assert float(loss) == 0.0
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("chunk_size", [None, 9])
@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("divisor", ["none", "float", "tensor"])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_chunked_head_matches_eager(softcap, divisor, trainable, chunk_size):
    hidden, weight, labels = make_inputs(40, 24, 97, logit_std=2.0)
    kw = dict(softcap=softcap, num_items_in_batch=divisor_for(divisor, labels), trainable=trainable)
    expected = run(eager_loss, hidden, weight, labels, **kw)

    def chunked(h, w, y, **kwargs):
        return ce.chunked_cross_entropy(h, lambda x: x @ w.t(), y, w.shape[0], **kwargs)

    assert_matches(run(chunked, hidden, weight, labels, chunk_size=chunk_size, **kw), expected, 1e-5)


@pytest.mark.parametrize("trainable", [True, False])
def test_chunked_module_head_matches_eager(trainable):
    hidden, weight, labels = make_inputs(30, 16, 70)
    head = torch.nn.Linear(16, 70, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    head.weight.requires_grad_(trainable)
    h = hidden.clone().requires_grad_(True)
    loss = ce.chunked_cross_entropy(h, head, labels, 70, softcap=1.5, chunk_size=8)
    loss.backward()
    expected = run(eager_loss, hidden, weight, labels, softcap=1.5, trainable=trainable)
    assert_matches((loss.detach(), h.grad, head.weight.grad), expected, 1e-5)


def test_chunked_head_all_ignored_and_no_grad():
    hidden, weight, labels = make_inputs(12, 8, 30, all_ignored=True)
    head = torch.nn.Linear(8, 30, bias=False)
    h = hidden.clone().requires_grad_(True)
    loss = ce.chunked_cross_entropy(h, head, labels, 30, num_items_in_batch=torch.tensor(3.0))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(h.grad, torch.zeros_like(h.grad))

    hidden, weight, labels = make_inputs(20, 8, 30)
    with torch.no_grad():
        got = ce.chunked_cross_entropy(hidden, lambda x: x @ weight.t(), labels, 30, chunk_size=6)
    assert abs(float(got) - float(eager_loss(hidden, weight, labels))) <= 1e-5 * float(got)


# ----------------------------------------------------------------------------- CPU: Triton under the interpreter

@pytest.fixture
def small_blocks(monkeypatch):
    """Vocab blocks of 128 so that V=300 takes three steps with a ragged last one."""
    monkeypatch.setattr(ce_triton, "_MAX_BLOCK", 128)


def triton_fn(h, w, y, **kwargs):
    return ce_triton.fused_linear_cross_entropy_triton(h, w, y, **kwargs)


@pytest.mark.parametrize("trainable,chunk_size", [(True, None), (True, 13), (False, 13)])
@pytest.mark.parametrize("divisor", ["none", "float", "tensor"])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_triton_matches_reference_fp32(small_blocks, softcap, divisor, trainable, chunk_size):
    hidden, weight, labels = make_inputs(40, 32, 300, logit_std=2.0)
    kw = dict(softcap=softcap, num_items_in_batch=divisor_for(divisor, labels), trainable=trainable,
              chunk_size=chunk_size)
    expected = run(ce.fused_linear_cross_entropy_reference, hidden, weight, labels, **kw)
    assert_matches(run(triton_fn, hidden, weight, labels, **kw), expected, 1e-5)


def test_triton_no_ignored_tokens_and_3d_int32_labels(small_blocks):
    hidden, weight, labels = make_inputs(2 * 16, 32, 300, ignore_every=0)
    hidden, labels = hidden.reshape(2, 16, 32), labels.reshape(2, 16).to(torch.int32)
    expected = run(ce.fused_linear_cross_entropy_reference, hidden, weight, labels.long(), chunk_size=10)
    assert_matches(run(triton_fn, hidden, weight, labels, chunk_size=10), expected, 1e-5)


def test_triton_fp16_several_chunks_and_weight_slices(small_blocks, monkeypatch):
    # 64-row vocab slices: the fp32 grad_W accumulator sees copy, add and add-and-cast steps.
    monkeypatch.setattr(ce_triton, "_GRAD_W_SLICE_BYTES", 64 * 32 * 2)
    hidden, weight, labels = make_inputs(48, 32, 300, dtype=torch.float16, logit_std=2.0)
    kw = dict(softcap=2.0, num_items_in_batch=torch.tensor(50.0))
    loss, gh, gw = run(triton_fn, hidden, weight, labels, chunk_size=13, **kw)
    assert gh.dtype == torch.float16 and gw.dtype == torch.float16
    expected = run(ce.fused_linear_cross_entropy_reference, hidden.float(), weight.float(), labels, **kw)
    assert_matches((loss, gh.float(), gw.float()), expected, 1e-2)


@pytest.mark.parametrize("trainable", [True, False])
def test_triton_all_ignored_is_zero(trainable):
    hidden, weight, labels = make_inputs(12, 8, 30, all_ignored=True)
    loss, gh, gw = run(triton_fn, hidden, weight, labels, trainable=trainable,
                       num_items_in_batch=torch.tensor(4.0))
    assert float(loss) == 0.0
    assert torch.equal(gh, torch.zeros_like(gh))
    assert (gw is None) if not trainable else torch.equal(gw, torch.zeros_like(gw))


def test_triton_no_grad_gives_loss_only(small_blocks):
    hidden, weight, labels = make_inputs(24, 32, 300)
    hidden.requires_grad_(True)
    with torch.no_grad():
        loss = triton_fn(hidden, weight, labels, softcap=3.0, chunk_size=10)
        expected = ce.fused_linear_cross_entropy_reference(hidden, weight, labels, softcap=3.0)
    assert loss.grad_fn is None
    assert abs(float(loss) - float(expected)) <= 1e-5 * float(expected)


def test_triton_under_autocast_uses_autocast_dtype(small_blocks):
    hidden, weight, labels = make_inputs(24, 32, 300)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, gh, gw = run(triton_fn, hidden, weight, labels, chunk_size=10)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32  # grads flow back through the casts
    expected = run(ce.fused_linear_cross_entropy_reference, hidden.half().float(), weight.half().float(), labels)
    assert_matches((loss, gh, gw), expected, 1e-2)


@pytest.mark.parametrize("scale", [3.0, 1000.0])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_row_kernel_matches_float64(small_blocks, softcap, scale):
    """Per-row losses and in-place gradient; logits in the thousands must not overflow the online
    log-sum-exp, and small capped logits check the kernel's tanh near 0."""
    rows, vocab = 16, 300
    logits = torch.randn(rows, vocab) * scale
    labels = torch.randint(0, vocab, (rows,))
    divisor = torch.tensor(7.0)
    losses = torch.full((rows,), float("nan"))
    grad = logits.clone()
    ce_triton.cross_entropy_rows_(grad, labels, losses, divisor, 0.0, softcap, write_grad=True)

    z = logits.double().requires_grad_(True)
    capped = softcap * torch.tanh(z / softcap) if softcap is not None else z
    expected = F.cross_entropy(capped, labels, reduction="none")
    (expected.sum() / 7.0).backward()
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    assert torch.allclose(losses.double(), expected.detach(), rtol=1e-5, atol=1e-6 * scale)
    assert torch.allclose(grad.double(), z.grad, rtol=1e-4, atol=1e-6)


def test_weight_grad_accumulator_fp16(monkeypatch):
    monkeypatch.setattr(ce_triton, "_GRAD_W_SLICE_BYTES", 40 * 16 * 2)
    vocab, hidden_size, chunks = 100, 16, [torch.randn(8, 100).half() for _ in range(4)]
    hs = [torch.randn(8, hidden_size).half() for _ in chunks]
    acc = ce_triton._WeightGradAccumulator(torch.empty(vocab, hidden_size, dtype=torch.float16), len(chunks))
    for g, h in zip(chunks, hs):
        acc.add(g, h)
    expected = sum(g.float().t() @ h.float() for g, h in zip(chunks, hs))
    assert acc.result.dtype == torch.float16
    assert rel_err(acc.result.float(), expected) <= 2e-3


def test_triton_torch_compile_and_opcheck(small_blocks):
    hidden, weight, labels = make_inputs(24, 16, 200)
    divisor = torch.tensor(30.0)

    def loss_fn(h, w, y):
        return ce_triton.fused_linear_cross_entropy_triton(h, w, y, softcap=2.0, num_items_in_batch=divisor)

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    expected = run(ce.fused_linear_cross_entropy_reference, hidden, weight, labels, softcap=2.0,
                   num_items_in_batch=divisor)
    assert_matches(run(lambda h, w, y: compiled(h, w, y), hidden, weight, labels), expected, 1e-5)

    op = torch.ops.sloth.fused_linear_cross_entropy.default
    for deferred in (False, True):
        args = (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True), labels, divisor, None,
                IGNORE, 2.0, 10, True, True, deferred)
        results = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in results.values()), (deferred, results)


# ----------------------------------------------------------------------------- CPU: fp16 and loss scaling

def _scaled_grads(fn, hidden, weight, labels, scale, **kw):
    """What a GradScaler does: backward of loss * scale, then the gradients divided by scale (in fp32)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = fn(h, w, labels, **kw)
    (loss * scale).backward()
    return loss.detach(), h.grad.float() / scale, w.grad.float() / scale


@pytest.mark.parametrize("scale", [1.0, 32768.0, 65536.0])     # plain backward; GradScaler scales
@pytest.mark.parametrize("path", ["reference", "triton"])
def test_fp16_gradients_survive_loss_scaling_and_small_probabilities(path, scale):
    """fp16: d loss/d logits / divisor is below fp16's smallest subnormal for most of a large vocabulary
    (32k, over 4096 tokens of gradient accumulation: 95% of the entries), and a GradScaler's 65536 is above
    fp16's largest value. Computed in the forward, the hidden states' gradient was 4.7% off (silently) at
    any scale and inf at 65536; sloth computes fp16 gradients in backward, with the scale folded in in fp32,
    as autograd does for the model's own loss: as close as that is at every scale (unscaled, both lose the
    small entries: that is what loss scaling is for), and close to fp32 under a GradScaler's scales."""
    torch.manual_seed(0)
    hidden, weight, labels = make_inputs(256, 32, 32000, dtype=torch.float16, logit_std=2.0, ignore_every=0)
    fn = ce.fused_linear_cross_entropy_reference if path == "reference" else triton_fn
    kw = dict(num_items_in_batch=4096)
    loss, gh, gw = _scaled_grads(fn, hidden, weight, labels, scale, chunk_size=128, **kw)
    expected = run(ce.fused_linear_cross_entropy_reference, hidden.float(), weight.float(), labels, **kw)
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    if scale > 1:
        assert_matches((loss, gh, gw), expected, 2e-3)
    # what autograd gives the model's own loss in fp16 (the full logits, then fp32): no closer than sloth
    _, eh, ew = _scaled_grads(eager_loss, hidden, weight, labels, scale, **kw)
    assert rel_err(gh, expected[1]) <= 1.1 * rel_err(eh, expected[1]) + 1e-4
    assert rel_err(gw, expected[2]) <= 1.1 * rel_err(ew, expected[2]) + 1e-4


def test_fp16_deferred_gradients_under_autocast_and_accumulation(small_blocks):
    """fp32 weights under fp16 autocast (HF Trainer(fp16=True)): the same gradients on both paths, two
    backward calls accumulate, and an incoming 0 gives zero gradients."""
    hidden, weight, labels = make_inputs(96, 32, 300, logit_std=2.0)
    results = []
    for fn in (ce.fused_linear_cross_entropy_reference, triton_fn):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.float16):
            first = fn(h, w, labels, chunk_size=40, num_items_in_batch=torch.tensor(200.0))
            second = fn(h, w, labels, chunk_size=40, num_items_in_batch=torch.tensor(200.0))
        (first * 1024.0).backward()
        (second * 1024.0).backward()
        assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
        results.append((first.detach() + second.detach(), h.grad / 1024.0, w.grad / 1024.0))
        hz = hidden.half().requires_grad_(True)
        (fn(hz, weight.half(), labels) * 0.0).backward()
        assert torch.equal(hz.grad, torch.zeros_like(hz))
    expected = run(ce.fused_linear_cross_entropy_reference, hidden.half().float(), weight.half().float(), labels,
                   num_items_in_batch=100.0)
    for got in results:
        assert_matches(got, expected, 2e-3)


# ----------------------------------------------------------------------------- GPU: real shapes

@pytest.fixture
def exact_fp32_matmul():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def fp32_reference(hidden, weight, labels, *, trainable, **kw):
    return run(ce.fused_linear_cross_entropy_reference, hidden.float(), weight.float(), labels,
               trainable=trainable, **kw)


GPU_CASES = [
    # dtype, tokens, hidden, vocab, softcap, trainable head, divisor
    (torch.bfloat16, 8192, 4096, 128256, None, False, "none"),     # Llama-3 8B, LoRA
    (torch.bfloat16, 8192, 4096, 128256, None, True, "tensor"),    # full fine-tune: 2 chunks
    (torch.bfloat16, 4096, 4096, 32000, 30.0, True, "float"),
    (torch.bfloat16, 512, 4096, 256000, 30.0, True, "tensor"),     # Gemma-2 vocab, softcap
    (torch.float16, 8192, 4096, 128256, None, False, "none"),      # fp16 autocast (GPUs without bf16)
    (torch.float16, 4096, 4096, 256000, 30.0, True, "tensor"),
    (torch.float32, 4096, 4096, 128256, None, True, "none"),
    (torch.float32, 8192, 4096, 128256, 30.0, False, "tensor"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,n,hidden_size,vocab,softcap,trainable,divisor", GPU_CASES)
def test_gpu_matches_fp32_reference(exact_fp32_matmul, dtype, n, hidden_size, vocab, softcap, trainable, divisor):
    hidden, weight, labels = make_inputs(n, hidden_size, vocab, dtype=dtype, device="cuda", ignore_every=9)
    assert ce.use_triton(hidden, weight), "the Triton path is off (SLOTH_DISABLE_TRITON?)"
    kw = dict(softcap=softcap, num_items_in_batch=divisor_for(divisor, labels, "cuda"))
    if dtype == torch.float16:      # fp16 trains under a GradScaler: unscaled, its gradients are fp16 subnormals
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(trainable)
        loss = ce.fused_linear_cross_entropy(h, w, labels, **kw)
        (loss * 65536.0).backward()
        assert h.grad.dtype == dtype and (w.grad is None or w.grad.dtype == dtype)
        gh, gw = h.grad.float() / 65536.0, None if w.grad is None else w.grad.float() / 65536.0
    else:
        loss, gh, gw = run(ce.fused_linear_cross_entropy, hidden, weight, labels, trainable=trainable, **kw)
        assert gh.dtype == dtype and (gw is None or gw.dtype == dtype)
    assert torch.isfinite(gh).all() and (gw is None or torch.isfinite(gw).all())
    expected = fp32_reference(hidden, weight, labels, trainable=trainable, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_matches((loss, gh.float(), None if gw is None else gw.float()), expected, tol)


@pytest.mark.gpu
def test_gpu_auto_chunks_keep_the_gpu_busy():
    device = torch.device("cuda")
    free, _ = torch.cuda.mem_get_info(device)
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB free")
    rows = ce_triton._rows_per_chunk(8192, 128256, 2, device, trainable_head=False)
    assert 1024 <= rows and rows * 128256 * 2 <= ce_triton._LOGITS_BYTES
    assert ce_triton._rows_per_chunk(8192, 32000, 2, device, trainable_head=False) == 8192


@pytest.mark.gpu
def test_gpu_all_ignored_and_no_grad():
    hidden, weight, labels = make_inputs(1024, 1024, 32000, dtype=torch.bfloat16, device="cuda", all_ignored=True)
    loss, gh, gw = run(ce.fused_linear_cross_entropy, hidden, weight, labels,
                       num_items_in_batch=torch.tensor(5.0, device="cuda"))
    assert float(loss) == 0.0 and not gh.any() and not gw.any()

    hidden, weight, labels = make_inputs(1024, 1024, 32000, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        got = ce.fused_linear_cross_entropy(hidden, weight, labels)
    expected = eager_loss(hidden.float(), weight.float(), labels)
    assert abs(float(got) - float(expected)) <= 1e-2 * float(expected)


@pytest.mark.gpu
def test_gpu_weight_grad_accumulator_bf16():
    vocab, hidden_size = 128256, 4096  # several vocab slices
    gs = [torch.randn(512, vocab, device="cuda").bfloat16() * 1e-3 for _ in range(3)]
    hs = [torch.randn(512, hidden_size, device="cuda").bfloat16() for _ in gs]
    acc = ce_triton._WeightGradAccumulator(torch.empty(vocab, hidden_size, dtype=torch.bfloat16, device="cuda"), 3)
    for g, h in zip(gs, hs):
        acc.add(g, h)
    expected = sum(g.float().t() @ h.float() for g, h in zip(gs, hs))
    assert rel_err(acc.result.float(), expected) <= 1e-2


@pytest.mark.gpu
def test_gpu_torch_compile_and_autocast(exact_fp32_matmul):
    hidden, weight, labels = make_inputs(2048, 1024, 32000, dtype=torch.bfloat16, device="cuda")
    divisor = torch.tensor(2000.0, device="cuda")

    def loss_fn(h, w, y):
        return ce.fused_linear_cross_entropy(h, w, y, softcap=30.0, num_items_in_batch=divisor)

    expected = fp32_reference(hidden, weight, labels, trainable=True, softcap=30.0, num_items_in_batch=divisor)
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss, gh, gw = run(lambda h, w, y: compiled(h, w, y), hidden, weight, labels)
    assert_matches((loss, gh.float(), gw.float()), expected, 1e-2)

    # fp32 master weights under bf16 autocast: computed in bf16, grads back in fp32.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, gh, gw = run(loss_fn, hidden.float(), weight.float(), labels)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    assert_matches((loss, gh, gw), expected, 1e-2)


@pytest.mark.parametrize("bad", [-1, 64, 1000])
def test_labels_outside_the_vocabulary_are_an_error_not_a_wrong_loss(bad):
    """Like F.cross_entropy: a label that is neither a class index nor ignore_index raises (on CUDA
    as a device-side assert, without a host sync), in the fused and the chunked loss."""
    hidden, weight = torch.randn(6, 16), torch.randn(64, 16)
    labels = torch.tensor([1, 2, -100, bad, 5, 6])
    with pytest.raises(RuntimeError, match="labels must lie in"):
        ce.fused_linear_cross_entropy(hidden, weight, labels)
    with pytest.raises(RuntimeError, match="labels must lie in"):
        ce.chunked_cross_entropy(hidden, lambda h: h @ weight.t(), labels, 64)
    labels[3] = -100
    assert torch.isfinite(ce.fused_linear_cross_entropy(hidden, weight, labels))
