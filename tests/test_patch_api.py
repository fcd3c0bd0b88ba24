"""patch / unpatch / SlothConfig / PatchReport behaviour, including every bad input the issue lists."""
import inspect
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaModel

import sloth_plugins as sloth
from sloth_plugins.testing import tiny_config, tiny_model


def _forward_state(model):
    """Every instance-level attribute sloth could touch, by module path, with object identity."""
    state = {}
    for name, module in model.named_modules():
        for attr in ("forward", "gradient_checkpointing", "_gradient_checkpointing_func",
                     "_set_gradient_checkpointing", "_sloth_state"):
            if attr in module.__dict__:
                state[(name, attr)] = module.__dict__[attr]
    return state


def _batch(model, seed=0, all_ignored=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=g)
    labels = torch.full_like(ids, -100) if all_ignored else ids.clone()
    return ids, labels


def test_config_unknown_key_names_valid_ones():
    with pytest.raises(sloth.SlothConfigError) as err:
        sloth.SlothConfig(kernel=True)
    assert "kernel" in str(err.value) and "gradient_checkpointing" in str(err.value) and "valid keys" in str(err.value)
    with pytest.raises(sloth.SlothConfigError, match="loss must be one of"):
        sloth.SlothConfig(loss="full")
    with pytest.raises(sloth.SlothConfigError, match="unknown kernel name"):
        sloth.SlothConfig(kernels=["rms_norm", "flash"])
    with pytest.raises(sloth.SlothConfigError, match="memory_budget_gb"):
        sloth.SlothConfig(memory_budget_gb=-1)
    assert sloth.SlothConfig(kernels="rms_norm,rope").enabled_kernels == ("rms_norm", "rope")
    assert sloth.SlothConfig.from_dict({"loss": "off"}).loss == "off"
    with pytest.raises(sloth.SlothConfigError):
        sloth.patch(tiny_model(), bogus=1)


def test_not_a_causal_lm_is_a_clear_type_error():
    with pytest.raises(TypeError, match="causal LM"):
        sloth.patch(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="AutoModelForCausalLM"):
        sloth.patch(LlamaModel(tiny_config("llama")))


def test_unpatch_restores_exactly_and_patch_is_idempotent():
    model = tiny_model("llama").train()
    before = _forward_state(model)
    signature = inspect.signature(model.forward)
    ids, labels = _batch(model)
    ref = model(input_ids=ids, labels=labels).loss

    first = sloth.patch(model)
    patched_state = _forward_state(model)
    second = sloth.patch(model)
    assert str(first) == str(second)
    assert patched_state.keys() == _forward_state(model).keys()
    assert inspect.signature(model.forward) == signature, "Trainer reads this signature"
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref)

    assert sloth.unpatch(model) is True
    after = _forward_state(model)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert sloth.unpatch(model) is False
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref)


def test_unpatch_on_unpatched_model_is_a_noop():
    model = tiny_model("qwen2")
    before = _forward_state(model)
    assert sloth.unpatch(model) is False
    assert _forward_state(model) == before


def test_patch_with_another_config_replaces_the_old_patches():
    model = tiny_model("llama")
    sloth.patch(model)
    report = sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="off"))
    assert report.entries == []
    assert "forward" not in model.model.norm.__dict__ and "forward" not in model.__dict__


def test_all_ignored_labels_give_zero_loss_and_zero_grads():
    model = tiny_model("llama").train()
    sloth.patch(model)
    ids, labels = _batch(model, all_ignored=True)
    with pytest.warns(UserWarning, match="sloth_plugins.*no labels"):   # transformers' own loss is NaN here
        out = model(input_ids=ids, labels=labels)
    assert out.loss.item() == 0.0 and not torch.isnan(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_tied_lm_head_gets_the_same_gradients():
    model = tiny_model("llama", tie_word_embeddings=True).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, labels = _batch(model)
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grad = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    sloth.patch(model)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(model.lm_head.weight.grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_dtypes(dtype, tol):
    model = tiny_model("llama", dtype=dtype).train()
    ids, labels = _batch(model)
    ref = model(input_ids=ids, labels=labels).loss.float()
    report = sloth.patch(model)
    assert not report.fallbacks()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.float(), ref, rtol=tol, atol=tol)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_eval_and_logits_requests_use_the_original_forward():
    model = tiny_model("llama").train()
    sloth.patch(model)
    ids, labels = _batch(model)
    assert model(input_ids=ids, labels=labels).logits is None
    assert model(input_ids=ids).logits.shape == (*ids.shape, model.config.vocab_size)
    model.eval()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and torch.isfinite(out.loss)
    model.train()
    sloth.patch(model, return_logits=True)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_num_items_in_batch_contract():
    model = tiny_model("llama").train()
    ids, labels = _batch(model)
    ref = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    sloth.patch(model)
    torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss, ref)
    torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=7).loss, ref)


def test_unknown_model_type_warns_and_gets_generic_patches():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).train()
    ids = torch.randint(0, 100, (2, 12))
    ref = model(input_ids=ids, labels=ids).loss
    with pytest.warns(UserWarning, match="no architecture entry"):
        report = sloth.patch(model)
    assert report.architecture is None
    assert report.count("loss") == 1 and report.count("rms_norm") == 0
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, ref)
    sloth.unpatch(model)
    with pytest.raises(sloth.SlothUnsupported, match="strict"):
        sloth.patch(model, strict=True)
    assert "forward" not in model.__dict__


def test_strict_turns_fallbacks_into_errors():
    model = tiny_model("llama", hidden_act="relu")
    report = sloth.patch(model)
    assert report.count("mlp", patched=False) == 2 and "relu" in str(report)
    sloth.unpatch(model)
    with pytest.raises(sloth.SlothUnsupported, match="fell back"):
        sloth.patch(model, strict=True)
    assert "forward" not in model.model.norm.__dict__


def test_report_is_readable_and_serialisable():
    report = sloth.patch(tiny_model("gemma2"))
    text = str(report)
    assert "rms_norm" in text and "softcap=30" in text
    data = report.to_dict()
    assert data["summary"]["rope"]["patched"] == 2 and data["model_type"] == "gemma2"


def test_third_party_plugin_contributes_an_architecture():
    pm = sloth.get_plugin_manager()

    class Plugin:
        @sloth.hookimpl
        def sloth_architectures(self):
            return [sloth.Architecture("gpt2-ish", ("gpt2",), layers="transformer.h", final_norm="transformer.ln_f")]

    plugin = Plugin()
    pm.register(plugin, name="test.gpt2")
    try:
        model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report = sloth.patch(model)
        assert report.architecture == "gpt2-ish"
        # GPT-2 uses LayerNorm with bias, GELU MLP and no rotary: each falls back with a reason
        assert report.count("rms_norm") == 0 and report.fallbacks()
    finally:
        pm.unregister(plugin)


def test_one_name_for_the_entry_point_group_and_the_pluggy_project():
    import pluggy

    from sloth_plugins import hookspecs, manager
    assert manager.ENTRY_POINT_GROUP == hookspecs.PROJECT == sloth.get_plugin_manager().project_name == "sloth_plugins"

    class Legacy:   # marked for the project's old pluggy name: still loads, with a warning naming the new marker
        @pluggy.HookimplMarker("sloth")
        def sloth_architectures(self):
            return [sloth.Architecture("legacy-gpt2", ("gpt2",), layers="transformer.h", final_norm="transformer.ln_f")]

    pm, plugin = sloth.get_plugin_manager(), Legacy()
    with pytest.warns(DeprecationWarning, match="use @sloth_plugins.hookimpl"):
        pm.register(plugin, name="test.legacy")
    try:
        model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
        assert sloth.patch(model).architecture == "legacy-gpt2"
    finally:
        pm.unregister(plugin)
