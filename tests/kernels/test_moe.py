"""Grouped-GEMM MoE experts (Triton) vs the torch reference: CPU under the interpreter (fp32, small
shapes), bf16 at real shapes on the GPU, also against transformers' own experts implementations."""
import pytest
import torch

from sloth_plugins.kernels.moe import moe_experts, moe_experts_reference, moe_experts_triton, supported

FP32 = dict(rtol=1e-5, atol=1e-5)


def _case(tokens, hidden, inter, experts, top_k, seed=0, dtype=torch.float32, device="cpu", skew=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    logits = torch.randn(tokens, experts, generator=g)
    if skew:                       # most tokens to expert 0, the last expert never chosen
        logits[:, 0] += 4.0
        logits[:, -1] -= 100.0
    weights, index = torch.topk(logits.softmax(-1), top_k)
    weights = weights / weights.sum(-1, keepdim=True)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden ** -0.5
    down = torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5
    to = dict(device=device, dtype=dtype)
    return (x.to(**to).requires_grad_(), index.to(device), weights.to(**to).requires_grad_(),
            gate_up.to(**to).requires_grad_(), down.to(**to).requires_grad_())


def _grads(fn, args, kind, grad_out):
    out = fn(*args, kind)
    leaves = [args[i] for i in (0, 2, 3, 4)]
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("shape", [(40, 48, 40, 6, 2, False), (33, 32, 24, 4, 1, False), (50, 32, 16, 8, 3, True),
                                   (1, 32, 16, 4, 2, False)],
                         ids=["mixtral_like", "top1_ragged", "skewed_unused_expert", "one_token"])
def test_triton_matches_reference_fp32(shape):
    tokens, hidden, inter, experts, top_k, skew = shape
    args = _case(tokens, hidden, inter, experts, top_k, skew=skew)
    before = [a.detach().clone() for a in args]
    grad_out = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(5))
    out, grads = _grads(lambda *a: moe_experts_triton(*a, block_m=16), args, "swiglu", grad_out)
    ref, ref_grads = _grads(moe_experts_reference, args, "swiglu", grad_out)
    assert out.dtype == ref.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **FP32)
    for name, got, want in zip(("x", "top_k_weights", "gate_up_proj", "down_proj"), grads, ref_grads):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **FP32, msg=name)
    assert all(torch.equal(a.detach(), b) for a, b in zip(args, before))
    if skew:
        assert torch.count_nonzero(grads[2][-1]) == 0 and torch.count_nonzero(grads[3][-1]) == 0


@pytest.mark.parametrize("kind", ["geglu", "geglu_tanh"])
def test_triton_geglu_experts(kind):
    args = _case(24, 32, 16, 4, 2, seed=3)
    grad_out = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    out, grads = _grads(lambda *a: moe_experts_triton(*a, block_m=16), args, kind, grad_out)
    ref, ref_grads = _grads(moe_experts_reference, args, kind, grad_out)
    torch.testing.assert_close(out, ref, **FP32)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **FP32)


def test_frozen_inputs_get_no_gradient_work():
    x, index, weights, gate_up, down = _case(20, 32, 16, 4, 2)
    x, weights = x.detach(), weights.detach()
    out = moe_experts_triton(x, index, weights, gate_up, down, "swiglu", block_m=16)
    ref = moe_experts_reference(x, index, weights, gate_up, down, "swiglu")
    got = torch.autograd.grad(out.sum(), (gate_up, down))
    want = torch.autograd.grad(ref.sum(), (gate_up, down))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **FP32)


def test_reference_is_the_per_expert_definition():
    """The reference against the plain per-token sum, written independently."""
    x, index, weights, gate_up, down = (t.detach() for t in _case(12, 16, 8, 3, 2, seed=9))
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(index.shape[1]):
            e = index[t, k]
            h = gate_up[e] @ x[t]
            a = torch.nn.functional.silu(h[:8]) * h[8:]
            want[t] += weights[t, k] * (down[e] @ a)
    torch.testing.assert_close(moe_experts_reference(x, index, weights, gate_up, down, "swiglu"), want, **FP32)


def test_public_dispatch_off_cuda_is_the_reference_and_supported_says_why():
    args = [t.detach() for t in _case(8, 16, 8, 4, 2)]
    assert torch.equal(moe_experts(*args, "swiglu"), moe_experts_reference(*args, "swiglu"))
    assert "bf16" in supported(*args)                                    # fp32 weights: not the Triton path
    bf = [a.to(torch.bfloat16) if a.is_floating_point() else a for a in args]
    assert supported(*bf) is None
    assert "3-D" in supported(bf[0], bf[1], bf[2], bf[3][0], bf[4])


# ---------------------------------------------------------------------------------------------- GPU

def _hf_experts(family, hidden, inter, experts, top_k, implementation):
    """transformers' own experts module of ``family`` with ``experts_implementation``."""
    from transformers import CONFIG_MAPPING
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.qwen3_moe import modeling_qwen3_moe
    kw = dict(hidden_size=hidden, num_experts_per_tok=top_k, hidden_act="silu")
    if family == "mixtral":
        config = CONFIG_MAPPING["mixtral"](intermediate_size=inter, num_local_experts=experts, **kw)
        cls = modeling_mixtral.MixtralExperts
    else:
        config = CONFIG_MAPPING["qwen3_moe"](moe_intermediate_size=inter, num_experts=experts, **kw)
        cls = modeling_qwen3_moe.Qwen3MoeExperts
    config._experts_implementation = implementation
    return cls(config)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 2048, 768, 128, 8), (4096, 4096, 14336 // 4, 8, 2)],
                         ids=["qwen3_30b_a3b", "mixtral_quarter_width"])
def test_gpu_bf16_parity_with_transformers_experts(shape):
    """bf16 forward + backward of the Triton path vs transformers' grouped_mm and eager experts (the
    fp32 reference is the judge: ours must be at least as close to it as transformers' own)."""
    tokens, hidden, inter, experts, top_k = shape
    x, index, weights, gate_up, down = _case(tokens, hidden, inter, experts, top_k, device="cuda",
                                             dtype=torch.bfloat16)
    grad_out = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    leaves = (x, weights, gate_up, down)
    out = moe_experts_triton(x, index, weights, gate_up, down, "swiglu")
    got = torch.autograd.grad(out, leaves, grad_out)
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    ref = moe_experts_reference(f32[0], index, f32[1], f32[2], f32[3], "swiglu")
    want = torch.autograd.grad(ref, f32, grad_out.float())

    def err(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    for implementation in ("grouped_mm", "eager"):
        module = _hf_experts("qwen3_moe", hidden, inter, experts, top_k, implementation).cuda().to(torch.bfloat16)
        with torch.no_grad():
            module.gate_up_proj.copy_(gate_up)
            module.down_proj.copy_(down)
        xh, wh = x.detach().requires_grad_(), weights.detach().requires_grad_()
        hf = module(xh, index, wh)
        hf_grads = torch.autograd.grad(hf, (xh, wh, module.gate_up_proj, module.down_proj), grad_out)
        assert err(out, ref) <= 1.5 * err(hf, ref) + 1e-3, implementation
        for name, a, b, r in zip(("x", "weights", "gate_up", "down"), got, hf_grads, want):
            assert torch.isfinite(a).all(), name
            assert err(a, r) <= 1.5 * err(b, r) + 1e-3, (implementation, name, err(a, r), err(b, r))
    assert err(out, ref) < 1e-2


@pytest.mark.parametrize("which", ["both", "gate_up", "down"])
def test_triton_lora_on_expert_weights_matches_reference(which):
    """LoRA on the expert stacks as rank-r grouped GEMMs (never W + s·B·A) vs the reference that forms
    W + s·B·A; B given as a strided view, the way PEFT's [out, r·E] weight is laid out."""
    from sloth_plugins.kernels.moe import ExpertLora
    x, index, weights, gate_up, down = _case(30, 32, 16, 4, 2, seed=4)
    gate_up, down = gate_up.detach(), down.detach()            # frozen base, as under LoRA
    g = torch.Generator().manual_seed(6)
    r, experts = 4, 4

    def lora(out_dim, in_dim):
        A = (torch.randn(experts * r, in_dim, generator=g) * 0.2).requires_grad_()
        B = (torch.randn(out_dim, r * experts, generator=g) * 0.2).requires_grad_()
        return A, B, ExpertLora(A.reshape(experts, r, in_dim), B.reshape(out_dim, r, experts).permute(2, 0, 1), 0.5)

    gu_A, gu_B, lora_gu = lora(32, 32)
    d_A, d_B, lora_d = lora(32, 16)
    lora_gu = lora_gu if which in ("both", "gate_up") else None
    lora_d = lora_d if which in ("both", "down") else None
    leaves = [x, weights] + ([gu_A, gu_B] if lora_gu else []) + ([d_A, d_B] if lora_d else [])
    grad_out = torch.randn(30, 32, generator=g)
    out = moe_experts_triton(x, index, weights, gate_up, down, "swiglu", block_m=16, lora_gate_up=lora_gu,
                             lora_down=lora_d)
    ref = moe_experts_reference(x, index, weights, gate_up, down, "swiglu", lora_gu, lora_d)
    torch.testing.assert_close(out, ref, **FP32)
    for got, want in zip(torch.autograd.grad(out, leaves, grad_out), torch.autograd.grad(ref, leaves, grad_out)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **FP32)


@pytest.mark.gpu
def test_gpu_bf16_lora_experts_close_to_fp32_reference():
    """Qwen3-30B-A3B shape, LoRA r=16 on both stacks in bf16 vs the fp32 reference (W + s·B·A)."""
    from sloth_plugins.kernels.moe import ExpertLora
    tokens, hidden, inter, experts, top_k, r = 4096, 2048, 768, 128, 8, 16
    x, index, weights, gate_up, down = _case(tokens, hidden, inter, experts, top_k, device="cuda",
                                             dtype=torch.bfloat16)
    gate_up, down = gate_up.detach(), down.detach()
    g = torch.Generator(device="cuda").manual_seed(3)

    def factor(*shape, scale):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(torch.bfloat16).requires_grad_()

    adapters = [factor(experts * r, hidden, scale=hidden ** -0.5), factor(2 * inter, r * experts, scale=0.05),
                factor(experts * r, inter, scale=inter ** -0.5), factor(hidden, r * experts, scale=0.05)]

    def loras(ad):
        return [ExpertLora(A.reshape(experts, r, -1), B.reshape(B.shape[0], r, experts).permute(2, 0, 1), 2.0)
                for A, B in (ad[:2], ad[2:])]

    grad_out = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    leaves = [x, weights, *adapters]
    out = moe_experts_triton(x, index, weights, gate_up, down, "swiglu", 64, *loras(adapters))
    got = torch.autograd.grad(out, leaves, grad_out)
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    ref = moe_experts_reference(f32[0], index, f32[1], gate_up.float(), down.float(), "swiglu", *loras(f32[2:]))
    want = torch.autograd.grad(ref, f32, grad_out.float())
    for name, a, b in zip(("out", "x", "weights", "A_gu", "B_gu", "A_d", "B_d"), (out, *got), (ref, *want)):
        assert torch.isfinite(a).all(), name
        assert ((a.float() - b).norm() / b.norm()).item() < 2e-2, name
