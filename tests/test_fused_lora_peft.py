"""The fused LoRA forwards vs calling the real PEFT modules: outputs and dx, dA, dB.

Tiny Llama / Phi-3 blocks from transformers wrapped by peft, dense and bitsandbytes 4-bit
bases, fp32 (tight), fp16 base with fp32 adapters and bf16 autocast (loose), and the reasons
the glue gives for not fusing.
"""
import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, Phi3Config  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP  # noqa: E402
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3MLP  # noqa: E402

from sloth_plugins.plugins import fused_lora as FL  # noqa: E402

FP32 = dict(rtol=1e-5, atol=1e-5)
ACTIVATION_OF = {"silu": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh"}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Block(nn.Module):
    def __init__(self, attn, mlp):
        super().__init__()
        self.self_attn, self.mlp = attn, mlp


def llama_block(hidden_act="silu", attention_bias=False, dtype=torch.float32, intermediate=96):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, hidden_act=hidden_act, attention_bias=attention_bias)
    return Block(LlamaAttention(cfg, layer_idx=0), LlamaMLP(cfg)).to(dtype)


def peft_block(block, targets=ALL_LINEAR, **lora_kwargs):
    kwargs = dict(r=8, lora_alpha=16, init_lora_weights=False, target_modules=targets)
    kwargs.update(lora_kwargs)
    model = get_peft_model(block, LoraConfig(**kwargs))
    model.train()
    return model, model.base_model.model


def _close(got, want, tol):
    """tol: assert_close tolerances (atol scaled to the tensor's magnitude), or a float: the
    largest allowed relative norm of the difference."""
    if isinstance(tol, float):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err <= tol, err
        return
    scale = want.detach().abs().max().float().clamp(min=1).item()
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def check_against_peft(model, fused_fn, peft_fn, x, tol=FP32):
    """Same outputs, and the same gradients for x and every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    leaves = [x] + params

    def run(fn):
        out = fn(x)
        out = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(1)
        loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in out)
        return out, torch.autograd.grad(loss, leaves, allow_unused=True)

    out, grads = run(fused_fn)
    want_out, want_grads = run(peft_fn)
    for o, w in zip(out, want_out):
        assert o.dtype == w.dtype and o.shape == w.shape and torch.isfinite(o).all()
        _close(o, w, tol)
    used = 0
    for g, w in zip(grads, want_grads):
        assert (g is None) == (w is None)
        if w is not None:
            used += 1
            assert g.dtype == w.dtype and torch.isfinite(g).all()
            _close(g, w, tol)
    assert used > 1


@pytest.mark.parametrize("hidden_act", list(ACTIVATION_OF))
def test_llama_mlp(hidden_act):
    model, block = peft_block(llama_block(hidden_act))
    x = torch.randn(2, 5, 64, requires_grad=True)
    assert FL.mlp_support(block.mlp) == (True, "")
    check_against_peft(model, lambda t: FL.fused_mlp_forward(block.mlp, t, ACTIVATION_OF[hidden_act]),
                       block.mlp, x)


@pytest.mark.parametrize("attention_bias", [False, True])
def test_llama_qkv_and_o(attention_bias):
    model, block = peft_block(llama_block(attention_bias=attention_bias), targets=["q_proj", "v_proj", "o_proj"],
                              use_rslora=True)
    attn = block.self_attn
    assert type(attn.k_proj) is nn.Linear  # untargeted: fused as a plain projection
    assert FL.qkv_support(attn) == (True, "")
    x = torch.randn(3, 4, 64, requires_grad=True)
    check_against_peft(model, lambda t: FL.fused_qkv_forward(attn, t),
                       lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)), x)
    check_against_peft(model, lambda t: FL.fused_o_forward(attn.o_proj, t), attn.o_proj, x)


def test_phi3_fused_gate_up_and_qkv():
    cfg = Phi3Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                     pad_token_id=0)
    model, block = peft_block(Block(Phi3Attention(cfg, layer_idx=0), Phi3MLP(cfg)),
                              targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    x = torch.randn(2, 3, 64, requires_grad=True)
    assert FL.mlp_support(block.mlp, "gate_up_proj", None) == (True, "")
    check_against_peft(model, lambda t: FL.fused_mlp_forward(block.mlp, t, "swiglu", "gate_up_proj", None),
                       block.mlp, x)
    check_against_peft(model, lambda t: FL.fused_linear_forward(block.self_attn.qkv_proj, t),
                       block.self_attn.qkv_proj, x)


def _quantize_linears(block, quant_type, nested, compute_dtype=torch.float32, device="cpu"):
    bnb = pytest.importorskip("bitsandbytes")
    for parent in (block.self_attn, block.mlp):
        for name, lin in list(parent.named_children()):
            if not isinstance(lin, nn.Linear):
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=compute_dtype,
                                  compress_statistics=nested, quant_type=quant_type, device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                         compress_statistics=nested, quant_type=quant_type)
            setattr(parent, name, q.to(device))  # quantizes
    block.is_loaded_in_4bit = True  # how peft picks its bnb LoRA layers
    return block


def _quantized_block(quant_type, nested):
    # Rows a multiple of the blocksize: bitsandbytes' CPU kernel mis-indexes absmax otherwise
    # (blocks restart at each row; its quantizer and CUDA kernel run them across rows).
    return _quantize_linears(llama_block(intermediate=128), quant_type, nested)


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_bnb_linear4bit_base(quant_type, nested):
    model, block = peft_block(_quantized_block(quant_type, nested),
                              targets=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"])
    assert type(block.mlp.gate_proj).__module__ == "peft.tuners.lora.bnb"
    assert block.mlp.gate_proj.get_base_layer().weight.quant_state.nested == nested
    for layer in (block.mlp.gate_proj, block.mlp.up_proj, block.self_attn.v_proj):  # LoRA, and plain 4-bit
        assert FL.projection_support(layer) == (True, "")
    x = torch.randn(2, 4, 64, requires_grad=True)
    check_against_peft(model, lambda t: FL.fused_mlp_forward(block.mlp, t, "swiglu"), block.mlp, x)
    attn = block.self_attn
    check_against_peft(model, lambda t: FL.fused_qkv_forward(attn, t),
                       lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)), x)
    check_against_peft(model, lambda t: FL.fused_o_forward(attn.o_proj, t), attn.o_proj, x)


def test_fp16_base_with_fp32_adapters_no_autocast():
    model, block = peft_block(llama_block(dtype=torch.float16))
    assert block.mlp.gate_proj.lora_A["default"].weight.dtype == torch.float32  # peft's autocast_adapter_dtype
    x = torch.randn(2, 5, 64, dtype=torch.float16, requires_grad=True)
    loose = dict(rtol=1e-2, atol=1e-2)
    check_against_peft(model, lambda t: FL.fused_mlp_forward(block.mlp, t, "swiglu"), block.mlp, x, loose)
    attn = block.self_attn
    check_against_peft(model, lambda t: FL.fused_qkv_forward(attn, t),
                       lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)), x, loose)


def test_bf16_autocast_on_cpu():
    model, block = peft_block(llama_block())
    x = torch.randn(2, 5, 64, requires_grad=True)
    loose = dict(rtol=3e-2, atol=3e-2)

    def under_autocast(fn):
        def run(t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(t)
        return run
    check_against_peft(model, under_autocast(lambda t: FL.fused_mlp_forward(block.mlp, t, "swiglu")),
                       under_autocast(block.mlp), x, loose)
    check_against_peft(model, under_autocast(lambda t: FL.fused_o_forward(block.self_attn.o_proj, t)),
                       under_autocast(block.self_attn.o_proj), x, loose)


def test_inactive_second_adapter_is_ignored():
    model, block = peft_block(llama_block(), targets=["o_proj"])
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["o_proj"]))
    model.set_adapter("other")
    layer = block.self_attn.o_proj
    assert FL.lora_layer_support(layer) == (True, "")
    assert FL.extract_lora(layer).A is layer.lora_A["other"].weight
    x = torch.randn(2, 3, 64, requires_grad=True)
    check_against_peft(model, lambda t: FL.fused_o_forward(layer, t), layer, x)


# ----------------------------------------------------------------------------- fallbacks

@pytest.mark.parametrize("lora_kwargs,reason", [
    (dict(lora_dropout=0.05), "lora_dropout=0.05 > 0"),
    (dict(use_dora=True), "DoRA"),
    (dict(lora_bias=True), "lora_bias"),
])
def test_unsupported_configs_say_why(lora_kwargs, reason):
    _, block = peft_block(llama_block(attention_bias=True), targets=["q_proj", "k_proj", "v_proj"], **lora_kwargs)
    assert FL.lora_layer_support(block.self_attn.q_proj) == (False, reason)
    assert FL.qkv_support(block.self_attn) == (False, f"q_proj: {reason}")
    with pytest.raises(FL.UnsupportedLoraLayer, match=reason):
        FL.fused_qkv_forward(block.self_attn, torch.randn(1, 2, 64))


def test_two_active_adapters():
    model, block = peft_block(llama_block(), targets=["o_proj"])
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"]))
    model.base_model.set_adapter(["default", "other"])
    assert FL.lora_layer_support(block.self_attn.o_proj) == (False, "2 active adapters")


def test_disabled_and_merged_adapters_fall_back_at_call_time():
    model, block = peft_block(llama_block(), targets=["o_proj"])
    layer = block.self_attn.o_proj
    x = torch.randn(1, 2, 64)
    with model.disable_adapter():
        assert FL.lora_layer_support(layer) == (False, "adapters are disabled")
        with pytest.raises(FL.UnsupportedLoraLayer, match="disabled"):
            FL.fused_o_forward(layer, x)
    FL.fused_o_forward(layer, x)
    layer.merge()
    assert FL.lora_layer_support(layer) == (False, "adapter is merged into the base weight")
    layer.unmerge()
    assert FL.lora_layer_support(layer) == (True, "")


def test_non_lora_modules():
    assert FL.lora_layer_support(nn.Linear(4, 4)) == (False, "Linear is not a PEFT LoRA layer")
    trainable = nn.Linear(4, 4, bias=False)
    assert FL.projection_support(trainable) == (False, "base weight is trainable")
    frozen = nn.Linear(4, 4, bias=False).requires_grad_(False)
    assert FL.projection_support(frozen) == (True, "")
    assert FL.mlp_support(nn.Module()) == (False, "no gate_proj, up_proj, down_proj")


# ----------------------------------------------------------------------------- GPU, 8B shapes

def _llama3_8b_block(quant_type=None):
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128)
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = Block(LlamaAttention(cfg, layer_idx=0), LlamaMLP(cfg)).to(torch.bfloat16)
    if quant_type is not None:
        block = _quantize_linears(block, quant_type, True, torch.bfloat16, "cuda")
    return block


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", [None, "nf4"])
@pytest.mark.parametrize("autocast", [False, True])
def test_gpu_llama3_8b_layer_vs_peft(quant_type, autocast):
    """bf16 weights; LoRA r=16 in bf16 (no autocast) or fp32 under bf16 autocast (HF Trainer's setup)."""
    model = get_peft_model(_llama3_8b_block(quant_type),
                           LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=ALL_LINEAR),
                           autocast_adapter_dtype=autocast)
    model.train()
    block = model.base_model.model
    x = torch.randn(2, 2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def maybe_autocast(fn):
        def run(t):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                return fn(t)
        return run
    attn = block.self_attn
    check_against_peft(model, maybe_autocast(lambda t: FL.fused_mlp_forward(block.mlp, t, "swiglu")),
                       maybe_autocast(block.mlp), x, 1e-2)
    check_against_peft(model, maybe_autocast(lambda t: FL.fused_qkv_forward(attn, t)),
                       maybe_autocast(lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t))), x, 1e-2)
    check_against_peft(model, maybe_autocast(lambda t: FL.fused_o_forward(attn.o_proj, t)),
                       maybe_autocast(attn.o_proj), x, 1e-2)


def test_qlora_backward_reuses_the_weights_its_forward_dequantized(monkeypatch):
    """Through the PEFT patch (which hands the kernels a fresh .data view per call): a layer's
    backward right after its forward finds its 4-bit weights still dequantized."""
    import sloth_plugins.kernels.nf4 as nf4
    nf4.clear_dequant_buffers()
    calls = []
    real = nf4.dequantize_4bit_reference
    monkeypatch.setattr(nf4, "dequantize_4bit_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, block = peft_block(_quantized_block("nf4", True), targets=["gate_proj", "up_proj", "down_proj"])
    x = torch.randn(2, 4, 64, requires_grad=True)
    out = FL.fused_mlp_forward(block.mlp, x, "swiglu")
    forward_calls = len(calls)
    out.float().pow(2).mean().backward()
    assert forward_calls == 3 and len(calls) == 3, (forward_calls, len(calls))
    FL.fused_mlp_forward(block.mlp, x, "swiglu")         # the same weights again: still held
    assert len(calls) == 3
    nf4.clear_dequant_buffers()


# ----------------------------------------------------------------------------- per-call cost

def test_extraction_is_reused_until_something_it_depends_on_changes():
    model, block = peft_block(llama_block(), targets=["o_proj"])
    layer = block.self_attn.o_proj
    x = torch.randn(2, 3, 64)
    assert FL.extract_lora(layer) is FL.extract_lora(layer)          # nothing changed: the same object

    def matches_peft():
        layer.lora_dropout["default"].eval()
        torch.testing.assert_close(FL.fused_o_forward(layer, x), layer.get_base_layer()(x)
                                   + layer.scaling["default"] * layer.lora_B["default"](layer.lora_A["default"](x)))

    matches_peft()
    layer.lora_A["default"].weight = nn.Parameter(torch.randn(8, 64))  # e.g. a sharding engine swapping params
    assert FL.extract_lora(layer).A is layer.lora_A["default"].weight
    matches_peft()
    layer.set_scale("default", 3.0)
    assert FL.extract_lora(layer).scale == layer.scaling["default"] != 2.0
    matches_peft()
    layer.lora_dropout["default"] = nn.Dropout(0.1)
    with pytest.raises(FL.UnsupportedLoraLayer, match="lora_dropout=0.1"):
        FL.fused_o_forward(layer, x)
    layer.lora_dropout["default"] = nn.Identity()
    matches_peft()
    layer.cast_input_dtype_enabled = False
    with pytest.raises(FL.UnsupportedLoraLayer, match="casting is disabled"):
        FL.fused_o_forward(layer, x)
    layer.cast_input_dtype_enabled = True
    with model.disable_adapter():
        with pytest.raises(FL.UnsupportedLoraLayer, match="disabled"):
            FL.fused_o_forward(layer, x)
    layer.get_base_layer().weight.requires_grad_(True)
    with pytest.raises(FL.UnsupportedLoraLayer, match="trainable"):
        FL.fused_o_forward(layer, x)


def _patched_tiny_llama(**config):
    import sloth_plugins as sloth
    from sloth_plugins.testing import tiny_model
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                           target_modules=ALL_LINEAR))
    model.train()
    return model, sloth.patch(model, sloth.SlothConfig(gradient_checkpointing="off", loss="off", **config))


def test_attention_computes_q_k_v_in_one_autograd_call(monkeypatch):
    model, report = _patched_tiny_llama()
    n_layers = model.config.num_hidden_layers
    assert report.count("lora_qkv") == n_layers and report.count("lora_o") == n_layers
    assert all("one autograd function" in how for how in report.summary()["lora_qkv"]["how"])
    calls = {"qkv": 0, "linear": 0}
    real_qkv, real_linear = FL.fused_qkv_forward, FL.fused_linear_forward
    monkeypatch.setattr(FL, "fused_qkv_forward", lambda *a, **k: calls.__setitem__("qkv", calls["qkv"] + 1)
                        or real_qkv(*a, **k))
    monkeypatch.setattr(FL, "fused_linear_forward", lambda *a, **k: calls.__setitem__("linear", calls["linear"] + 1)
                        or real_linear(*a, **k))
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    assert calls == {"qkv": n_layers, "linear": n_layers}      # o_proj alone
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    import sloth_plugins as sloth
    sloth.unpatch(model)
    attn = model.base_model.model.model.layers[0].self_attn
    assert not any("forward" in m.__dict__ for m in (attn, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    ref = model(input_ids=ids, labels=ids).loss
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, ref, **FP32)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **FP32)


def test_projection_called_on_another_tensor_computes_its_own_output():
    """Only a call with the attention's own, unchanged hidden_states gets the output computed
    with q; anything else (a hook that replaces the input, an in-place edit) is computed alone."""
    model, _ = _patched_tiny_llama()
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 5, model.config.hidden_size)
    direct = attn.k_proj(x)                                      # outside the attention forward
    torch.testing.assert_close(direct, attn.k_proj.get_base_layer()(x) + attn.k_proj.scaling["default"]
                               * attn.k_proj.lora_B["default"](attn.k_proj.lora_A["default"](x)), **FP32)
    seen = {}
    handle = attn.v_proj.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    attn.k_proj.register_forward_hook(lambda m, args, out: seen.__setitem__("k", (args[0], out)))
    attn.v_proj.register_forward_hook(lambda m, args, out: seen.__setitem__("v", (args[0], out)))
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids)
    handle.remove()
    for name in ("k", "v"):
        inp, out = seen[name]
        proj = getattr(attn, f"{name}_proj")
        want = proj.get_base_layer()(inp) + proj.scaling["default"] * proj.lora_B["default"](proj.lora_A["default"](inp))
        torch.testing.assert_close(out, want, **FP32)


def test_checkpoint_recompute_reuses_what_its_forward_extracted(monkeypatch):
    from torch.utils.checkpoint import checkpoint
    _, block = peft_block(llama_block(), targets=["o_proj"])
    layer = block.self_attn.o_proj
    x = torch.randn(2, 3, 64, requires_grad=True)
    calls = []
    real = FL._identity
    monkeypatch.setattr(FL, "_identity", lambda m: calls.append(1) or real(m))
    out = checkpoint(lambda t: FL.fused_o_forward(layer, t), x, use_reentrant=False)
    assert len(calls) == 1
    out.sum().backward()                      # the recompute runs inside backward: no second check
    assert len(calls) == 1 and x.grad is not None and layer.lora_A["default"].weight.grad is not None
    FL.fused_o_forward(layer, x)              # a forward outside backward checks again
    assert len(calls) == 2


def test_checkpoint_recompute_after_a_forward_with_another_adapter():
    """TRL's reference pass (DPO/KTO with an existing adapter): the policy's checkpointed forward,
    then ``set_adapter("ref")``, a no-grad forward and ``set_adapter("default")``, then backward.
    The recompute must use the default adapter's weights (it once took the ref adapter's: the
    adapter's gradients came out 40% off under torch's checkpoint, and None under sloth's)."""
    from torch.utils.checkpoint import checkpoint
    model, block = peft_block(llama_block(), targets=["o_proj"])
    model.add_adapter("ref", LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["o_proj"]))
    layer = block.self_attn.o_proj
    x = torch.randn(2, 3, 64)
    grads = []
    for fused in (False, True):
        def run(t):
            return FL.fused_o_forward(layer, t) if fused else layer(t)
        layer.set_adapter("default")
        out = checkpoint(run, x, use_reentrant=False)
        with torch.no_grad():
            layer.set_adapter("ref")
            run(x)
            layer.set_adapter("default")
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        grads.append(torch.autograd.grad(out.pow(2).sum(), (A, B)))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, **FP32)
