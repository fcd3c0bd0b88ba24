"""Mixture-of-experts families of the table: tiny configs from transformers, patched vs unpatched (fp32).

Same routing on both sides (same weights, fp32), so loss, router load-balancing loss and every gradient
must agree; LoRA on attention, shared experts and (PEFT ``target_parameters``) the 3-D expert weights;
saved adapters load in plain PEFT with the same logits; ``sloth doctor`` lists every patch.
"""
import dataclasses
import warnings

import pytest
import torch

import sloth_plugins as sloth
from sloth_plugins.testing import MOE_FAMILIES, tiny_model, with_lora

TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
EXPECTED_NORMS = {"mixtral": 5, "qwen3_moe": 9, "qwen2_moe": 5, "glm4_moe": 9}
# families whose forward adds a router load-balancing loss (GLM-4.5's router is balanced by its correction bias)
AUX_LOSS = {"mixtral": True, "qwen3_moe": True, "qwen2_moe": True, "glm4_moe": False}
EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def _model(family, **overrides):
    return tiny_model(family, seed=1, hidden_size=32, vocab_size=128, **overrides).train()


def _batch(vocab, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _gated_mlps(model):
    """The gated MLPs of a tiny model beside its MoE blocks: shared experts and dense layers."""
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    blocks = [layer.mlp for layer in layers]
    return [b for b in blocks if not hasattr(b, "experts")] + [
        getattr(b, n) for b in blocks for n in ("shared_expert", "shared_experts") if hasattr(b, n)]


def _moe_and_dense(model):
    """(MoE blocks, gated MLPs: shared experts + dense layers) of a tiny model, from its modules."""
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    return sum(hasattr(layer.mlp, "experts") for layer in layers), len(_gated_mlps(model))


def _with_adapters(model) -> int:
    """How many of those gated MLPs PEFT wrapped. PEFT (0.21) maps gate_proj / up_proj / down_proj targets of
    glm4_moe (its v4 -> v5 MoE conversion, transformers_weight_conversion.py) to the routed experts' 3-D
    parameters, so its shared experts and dense layers get no adapters from a LoraConfig."""
    return sum(hasattr(m.gate_proj, "lora_A") for m in _gated_mlps(model))


def _step(model, inputs, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _fields(out):
    """The fields of a forward's output class (the model's own, or sloth's subclass of it)."""
    return {f.name for f in dataclasses.fields(out)}


def _returns_router_logits(out) -> bool:
    """Whether the installed transformers' model returned router logits (GLM-4.5: not in 5.16, later yes)."""
    return "router_logits" in _fields(out)


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert _fields(out_a) == _fields(out_b), (type(out_a), type(out_b))      # the model's own output class
    torch.testing.assert_close(out_a.loss, out_b.loss, **TOL)
    aux_a, aux_b = getattr(out_a, "aux_loss", None), getattr(out_b, "aux_loss", None)
    assert (aux_a is None) == (aux_b is None)
    if aux_a is not None:
        torch.testing.assert_close(aux_a, aux_b, **TOL)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], **GRAD_TOL, msg=name)


@pytest.mark.parametrize("router_logits", [True, False], ids=["aux_loss", "no_aux_loss"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_family_full_finetune_matches_unpatched(family, router_logits):
    model = _model(family, output_router_logits=router_logits)
    inputs = _batch(model.config.vocab_size)
    ref = _step(model, inputs)
    assert (getattr(ref[0], "aux_loss", None) is not None) == (router_logits and AUX_LOSS[family])

    report = sloth.patch(model)
    assert report.architecture == family
    assert not report.fallbacks(), report
    layers = model.config.num_hidden_layers
    moe, dense = _moe_and_dense(model)               # glm4_moe: layer 0 dense (first_k_dense_replace)
    assert moe >= 1 and dense == {"mixtral": 0, "qwen3_moe": 0, "qwen2_moe": 2, "glm4_moe": 2}[family]
    assert report.count("rms_norm") == EXPECTED_NORMS[family] and report.count("rope") == layers
    assert report.count("moe_experts") == moe and report.count("loss") == 1
    assert report.count("gradient_checkpointing") == layers
    assert report.count("mlp") == dense                       # shared experts and dense layers
    got = _step(model, inputs)
    _assert_same(got, ref)
    (loss_entry,) = [e for e in report.entries if e.kind == "loss"]
    assert loss_entry.patched and "logits" not in got[0].keys(), loss_entry     # the fast loss ran
    if not _returns_router_logits(ref[0]):            # glm4_moe on transformers 5.16: the report says so
        assert "router logits unavailable" in loss_entry.detail, loss_entry
    assert sloth.unpatch(model)
    _assert_same(_step(model, inputs), ref)


def test_router_logits_asked_per_call_and_gradient_checkpointing():
    model = _model("qwen3_moe", mlp_only_layers=[1])          # layer 1: a dense MLP inside a MoE model
    model.gradient_checkpointing_enable()
    inputs = _batch(model.config.vocab_size)
    ref = _step(model, inputs, output_router_logits=True)
    report = sloth.patch(model)
    assert report.count("moe_experts") == 1 and report.count("mlp") == 1, report
    assert not report.fallbacks(), report
    _assert_same(_step(model, inputs, output_router_logits=True), ref)
    (loss_entry,) = [e for e in report.entries if e.kind == "loss"]
    assert loss_entry.patched, loss_entry


def test_glm4_moe_lora_with_gradient_checkpointing_and_router_logits_per_call():
    """GLM-4.5's block (sigmoid router with correction bias, shared expert) and its dense first layer, LoRA
    everywhere, checkpointing on, router logits asked per call (recorded, no load-balancing loss added)."""
    ref, model = (_lora(_model("glm4_moe", layers=3, first_k_dense_replace=1), experts=True) for _ in range(2))
    for m in (ref, model):
        m.gradient_checkpointing_enable()
        g = torch.Generator().manual_seed(5)
        for name, bias in m.named_buffers():          # the correction bias steers the routing (zeros at init)
            if name.endswith("e_score_correction_bias"):
                bias.normal_(generator=g)
    inputs = _batch(model.config.vocab_size)
    want = _step(ref, inputs, output_router_logits=True)
    report = sloth.patch(model)
    assert not report.fallbacks(), report
    assert report.count("moe_experts") == 2 and report.count("lora_mlp") + report.count("mlp") == 3, report
    assert report.count("lora_mlp") == _with_adapters(model)                             # dense layer + 2 shared
    assert report.count("gradient_checkpointing") == 3
    got = _step(model, inputs, output_router_logits=True)
    _assert_same(got, want)
    (loss_entry,) = [e for e in report.entries if e.kind == "loss"]
    assert loss_entry.patched and "logits" not in got[0].keys(), loss_entry          # the fast loss ran
    if _returns_router_logits(want[0]):               # transformers > 5.16: recorded, no loss term from them
        assert got[0].aux_loss is None and len(got[0].router_logits) == 2
        assert "router logits carried" in loss_entry.detail, loss_entry
        for a, b in zip(got[0].router_logits, want[0].router_logits):
            torch.testing.assert_close(a, b, **TOL)
    else:                                             # 5.16 returns none: asking changes nothing, and is reported
        assert "router logits unavailable" in loss_entry.detail and "carried" not in loss_entry.detail, loss_entry


def test_moe_forward_without_a_readable_output_class_runs_its_own_forward_for_router_logits():
    """A CausalLM subclass whose forward declares no output class (a user's wrapper, remote code): sloth cannot
    tell what it returns of its router, so calls asking for router logits run the model's own forward (the
    report's loss line then says so); calls that do not take the fast loss. The same numbers either way."""
    model = _model("qwen3_moe")

    class Wrapped(type(model)):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):     # no return annotation
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    model.__class__ = Wrapped
    inputs = _batch(model.config.vocab_size)
    plain, asked = _step(model, inputs), _step(model, inputs, output_router_logits=True)
    assert asked[0].aux_loss is not None
    report = sloth.patch(model)
    (entry,) = [e for e in report.entries if e.kind == "loss"]
    assert entry.patched and "declares no output class" in entry.detail, entry
    got = _step(model, inputs)
    _assert_same(got, plain)
    assert "logits" not in got[0].keys() and entry.patched, entry                      # the fast loss ran
    got = _step(model, inputs, output_router_logits=True)
    _assert_same(got, asked)
    assert "logits" in got[0].keys()                                                     # the model's own ran
    assert not entry.patched and "output_router_logits" in entry.detail, entry


def test_declared_output_reads_plain_and_union_annotations():
    from typing import Optional, Tuple, Union

    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    from sloth_plugins.plugins.router_outputs import declared_output

    def new(x) -> MoeCausalLMOutputWithPast: ...
    def old(x) -> Union[Tuple, MoeCausalLMOutputWithPast]: ...
    def bare(x): ...
    def other(x) -> Optional[torch.Tensor]: ...
    assert declared_output(new) is declared_output(old) is MoeCausalLMOutputWithPast
    assert declared_output(bare) is None and declared_output(other) is None


@pytest.mark.parametrize("router_logits", [False, True], ids=["packed", "router_logits_unpacked"])
def test_padding_free(router_logits):
    model = _model("qwen2_moe", output_router_logits=router_logits)
    inputs = _batch(model.config.vocab_size)
    ref = _step(model, inputs)
    report = sloth.patch(model, sloth.SlothConfig(padding_free=True))
    assert report.count("padding_free") == 1, report
    _assert_same(_step(model, inputs), ref)
    assert any("output_router_logits" in n for n in report.notes) == router_logits, report.notes


def test_auto_checkpointing_probe_does_not_record_router_logits_twice():
    """auto's memory probe runs a layer's forward once more on the first step; transformers must not record
    its router logits (the load-balancing loss would count them twice and reach the probe's graph)."""
    model = _model("qwen3_moe", output_router_logits=True)
    model.gradient_checkpointing_enable()
    inputs = _batch(model.config.vocab_size)
    ref = _step(model, inputs)
    report = sloth.patch(model, sloth.SlothConfig(gradient_checkpointing="auto", memory_budget_gb=1))
    for _ in range(2):
        _assert_same(_step(model, inputs), ref)
    assert report.count("gradient_checkpointing") == model.config.num_hidden_layers


def _lora(model, experts: bool):
    kw = dict(target_parameters=EXPERT_PARAMS) if experts else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return with_lora(model, **kw)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_lora_on_attention_shared_and_expert_weights(family, tmp_path, monkeypatch):
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper
    ref, model = (_lora(_model(family, output_router_logits=True), experts=True) for _ in range(2))
    inputs = _batch(model.config.vocab_size)
    report = sloth.patch(model)
    layers = model.config.num_hidden_layers
    moe, dense = _moe_and_dense(model)
    assert not report.fallbacks(), report
    assert report.count("lora_qkv") == layers and report.count("lora_o") == layers
    assert report.count("moe_experts") == moe
    assert all("fused" in e.detail for e in report.entries if e.kind == "moe_experts"), report
    wrapped = _with_adapters(model)
    assert wrapped == dense or family == "glm4_moe", (wrapped, dense)
    assert report.count("lora_mlp") == wrapped and report.count("mlp") == dense - wrapped    # shared experts, dense
    want = _step(ref, inputs)
    activations = []                          # PEFT's parametrization (W + s·B·A): not on the fused path
    real = ParamWrapper._activate_lora
    monkeypatch.setattr(ParamWrapper, "_activate_lora",
                        lambda self, *a: activations.append(self.parameter_name) or real(self, *a))
    got = _step(model, inputs)
    assert not set(activations) & {"gate_up_proj", "down_proj"}, activations   # (the router's own LoRA may)
    _assert_same(got, want)
    assert any("experts" in n and "lora_A" in n for n in got[1]), "no gradient reached the expert adapters"
    with model.disable_adapter(), ref.disable_adapter(), torch.no_grad():     # PEFT's own path: the base model
        torch.testing.assert_close(model(**inputs).loss, ref(**inputs).loss, **TOL)

    # the adapters saved from the patched model load in plain PEFT with the same logits
    model.save_pretrained(tmp_path)
    plain = PeftModel.from_pretrained(_model(family), tmp_path).eval()
    model.eval()
    ids = inputs["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, **TOL)


def test_expert_layout_the_kernel_does_not_know_falls_back_and_reports():
    model = _model("mixtral")
    inputs = _batch(model.config.vocab_size)
    ref = _step(model, inputs)
    model.model.layers[0].mlp.experts.has_bias = True           # as a biased experts class would say
    report = sloth.patch(model)
    (fallback,) = [e for e in report.entries if e.kind == "moe_experts" and not e.patched]
    assert fallback.path == "model.layers.0.mlp.experts" and "has_bias" in fallback.detail
    assert report.count("moe_experts") == 1
    model.model.layers[0].mlp.experts.has_bias = False
    _assert_same(_step(model, inputs), ref)


def test_moe_experts_kernel_can_be_switched_off():
    model = _model("mixtral")
    report = sloth.patch(model, sloth.SlothConfig(kernels={"moe_experts": False}))
    assert report.count("moe_experts") == 0 and report.count("rms_norm") == 5


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_doctor_lists_every_patch(family):
    from sloth_plugins.config import SlothConfig
    from sloth_plugins.doctor import patch_report
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = patch_report(family, SlothConfig())
    assert report.architecture == family and not report.fallbacks(), report
    kinds = set(report.kinds())
    assert {"rms_norm", "rope", "moe_experts", "loss", "gradient_checkpointing"} <= kinds, kinds
    assert ("mlp" in kinds) == (family in ("qwen2_moe", "glm4_moe"))


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gpu_bf16_training_parity(family):
    """bf16 on CUDA, 20 LoRA steps (attention, shared experts, expert weights through target_parameters),
    router load-balancing loss on: the patched model (Triton experts, kernels, chunked loss) trains like the
    unpatched one. bf16 can flip a near-tie in the routing, so losses are compared per step with a tolerance."""
    from sloth_plugins.kernels import use_triton
    from sloth_plugins.testing import tiny_model as build
    over = dict(num_attention_heads=8, num_key_value_heads=4, intermediate_size=2048, output_router_logits=True)
    over.update(dict(num_local_experts=8) if family == "mixtral" else
                dict(n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512) if family == "glm4_moe"
                else dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512))
    models = [_lora(build(family, seed=3, dtype=torch.bfloat16, hidden_size=1024, layers=4, vocab_size=4096,
                          **over), experts=True).cuda() for _ in range(2)]     # (with_lora seeds on the CPU)
    ref, model = models
    report = sloth.patch(model)
    moe, _ = _moe_and_dense(model)                      # glm4_moe: layer 0 is dense
    assert moe >= 3 and report.count("moe_experts") == moe and not report.fallbacks(), report
    g = torch.Generator(device="cuda").manual_seed(0)
    losses = {"ref": [], "sloth": []}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
            for k, m in (("ref", ref), ("sloth", model))}
    # two fixed batches in turn: fresh random tokens every step have no signal to learn (the loss only wanders,
    # as mixtral's did on the H200: 8.50 -> 8.54), repeated ones must be fitted
    batches = [torch.randint(3, 4096, (2, 512), device="cuda", generator=g) for _ in range(2)]
    for step in range(20):
        ids = batches[step % 2]
        for key, m in (("ref", ref), ("sloth", model)):
            m.train()
            out = m(input_ids=ids, labels=ids)
            out.loss.backward()
            opts[key].step()
            opts[key].zero_grad(set_to_none=True)
            losses[key].append(out.loss.item())
    assert use_triton(next(model.parameters()))
    for a, b in zip(losses["sloth"], losses["ref"]):
        assert abs(a - b) <= 2e-2 * abs(b) + 1e-2, (losses["sloth"], losses["ref"])
    for key in ("ref", "sloth"):
        assert sum(losses[key][-2:]) < sum(losses[key][:2]), losses


@pytest.mark.gpu
def test_gpu_fp32_experts_are_a_reported_fallback():
    model = _model("mixtral").cuda()
    report = sloth.patch(model)
    assert report.count("moe_experts") == 0
    assert all("float32" in e.detail for e in report.entries if e.kind == "moe_experts"), report
