"""copy.deepcopy, copy.copy and pickle of a patched model (EMA, AveragedModel, DPO reference models).

A deep copy or an unpickled copy must be its own patched model: perturbing its weights changes its
outputs and not the original's, and it computes what an unpatched model with its weights computes.
A copied submodule is an unpatched module computing with its own weights.
"""
import copy
import functools
import io
import pickle

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

import sloth_plugins as sloth  # noqa: E402
from sloth_plugins.checkpointing import get_checkpoint_controller  # noqa: E402
from sloth_plugins.models import resolve_causal_lm  # noqa: E402
from sloth_plugins.testing import tiny_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]
TOL = dict(rtol=1e-5, atol=3e-6)
FAMILIES = ("llama", "gemma2", "phi3", "qwen3")
# every family with the default config (gradient_checkpointing="auto"), every mode on llama
FAMILY_MODES = [(f, "auto") for f in FAMILIES] + [("llama", m) for m in ("off", "recompute", "offload")]
CHECKPOINT = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def peft_model(family, seed=0):
    model = tiny_model(family, seed=seed)
    torch.manual_seed(seed + 1)
    targets = [t for t in TARGETS if any(n.endswith("." + t) for n, _ in model.named_modules())]
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=targets))


def patched(family, mode="auto", framework_checkpointing=True):
    model = peft_model(family)
    sloth.patch(model, sloth.SlothConfig(gradient_checkpointing=mode))
    if framework_checkpointing:
        # what Trainer's gradient_checkpointing_enable() asks after the callback patched the model (without
        # the input-grad forward hook it also registers: a local function, which no pickler can save)
        resolve_causal_lm(model)._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=CHECKPOINT)
    return model.train()


def batch(vocab, seed=0):
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def outputs(model, ids, labels):
    """Train loss, LoRA gradients and eval logits."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.train()
    return loss.detach(), grads, logits


def perturb_lora(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def reference(family, model):
    """An unpatched PEFT model holding ``model``'s weights."""
    ref = peft_model(family)
    resolve_causal_lm(ref).load_state_dict(resolve_causal_lm(model).state_dict())
    return ref if resolve_causal_lm(model) is not model else resolve_causal_lm(ref)


def assert_same(got, want, **tol):
    torch.testing.assert_close(got[0], want[0], **(tol or TOL))
    assert got[1].keys() == want[1].keys() and got[1]
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], **(tol or TOL))
    torch.testing.assert_close(got[2], want[2], **(tol or TOL))


def assert_patched_copy(dup, original):
    state, original_state = sloth.get_state(dup), sloth.get_state(original)
    assert state is not None and state is not original_state
    assert state.config == original_state.config
    assert [e.kind for e in state.report.entries] == [e.kind for e in original_state.report.entries]
    lm = resolve_causal_lm(dup)
    ids, labels = batch(lm.config.vocab_size)
    training, _ = dup.training, dup.train()
    assert dup(input_ids=ids, labels=labels).logits is None, "the chunked loss runs: the copy's forward is patched"
    dup.train(training)
    controller = get_checkpoint_controller(dup)
    if state.config.gradient_checkpointing == "off":
        assert controller is None
    else:
        assert controller is not get_checkpoint_controller(original) and controller.model is lm
        assert all(a is b for a, b in zip(controller.layers, lm.model.layers))


@pytest.mark.parametrize("family,mode", FAMILY_MODES)
def test_deepcopy_is_an_independent_patched_model(family, mode):
    model = patched(family, mode)
    ids, labels = batch(model.config.vocab_size)
    before = outputs(model, ids, labels)

    dup = copy.deepcopy(model)
    assert type(dup) is type(model)    # PeftModel forwards unknown attributes, __deepcopy__ too, to the LM
    assert_patched_copy(dup, model)
    assert any(e.kind.startswith("lora_") for e in sloth.get_state(dup).report.entries)
    perturb_lora(dup)
    after = outputs(dup, ids, labels)
    assert not torch.allclose(after[0], before[0]) and not torch.allclose(after[2], before[2])
    assert_same(outputs(model, ids, labels), before, rtol=0, atol=0)
    assert_same(after, outputs(reference(family, dup), ids, labels))


def test_deepcopy_of_the_causal_lm_under_peft_and_a_second_copy():
    model = patched("llama")
    lm = resolve_causal_lm(model)
    dup = copy.deepcopy(lm)          # the LM alone: patched, with its own LoRA layers
    assert_patched_copy(dup, lm)
    second = copy.deepcopy(dup)      # a copy of a copy
    assert_patched_copy(second, dup)
    ids, labels = batch(lm.config.vocab_size)
    perturb_lora(second)
    assert_same(outputs(second, ids, labels), outputs(reference("llama", second), ids, labels))


def test_averaged_model():
    model = patched("llama")
    averaged = torch.optim.swa_utils.AveragedModel(model)
    assert_patched_copy(averaged.module, model)
    perturb_lora(model)
    averaged.update_parameters(model)
    ids, labels = batch(model.config.vocab_size)
    averaged.eval()
    with torch.no_grad():
        logits = averaged(input_ids=ids).logits
    torch.testing.assert_close(logits, outputs(reference("llama", averaged.module), ids, labels)[2], **TOL)


def _plain_model_pickles() -> bool:
    """Whether an unpatched model pickles at all here: with HF's ``kernels`` package installed (the
    Axolotl environment), transformers attaches hub-kernel modules of a local class that no pickler
    can name, with or without sloth."""
    try:
        pickle.dumps(tiny_model("llama"))
    except (AttributeError, pickle.PicklingError):
        return False
    return True


PICKLES = _plain_model_pickles()
needs_pickle = pytest.mark.skipif(not PICKLES, reason="an unpatched model does not pickle in this environment "
                                                      "(hub-kernel modules of a local class)")


def _pickled(model):
    """The pickle round trip where models pickle here (see PICKLES), else a deep copy."""
    return pickle.loads(pickle.dumps(model)) if PICKLES else copy.deepcopy(model)


def _torch_roundtrip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _pickle_roundtrip(model):
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("family,mode,roundtrip", [
    ("llama", "auto", _pickle_roundtrip), ("llama", "auto", _torch_roundtrip), ("gemma2", "recompute", _pickle_roundtrip),
    ("phi3", "offload", _torch_roundtrip), ("qwen3", "off", _pickle_roundtrip)])
@needs_pickle
def test_pickle_roundtrip_gives_a_patched_model(family, mode, roundtrip):
    model = patched(family, mode)
    ids, labels = batch(model.config.vocab_size)
    want = outputs(model, ids, labels)
    state = dict(resolve_causal_lm(model).__dict__)

    loaded = roundtrip(model)
    assert resolve_causal_lm(model).__dict__ == state, "pickling changed the original"
    assert_patched_copy(loaded, model)
    assert_same(outputs(loaded, ids, labels), want)
    perturb_lora(loaded)
    assert_same(outputs(model, ids, labels), want, rtol=0, atol=0)
    assert_same(outputs(loaded, ids, labels), outputs(reference(family, loaded), ids, labels))


def test_copied_submodules_are_unpatched_and_use_their_own_weights():
    model = patched("llama", "recompute")
    lm = resolve_causal_lm(model)
    pristine = peft_model("llama").base_model.model.model.layers[0]
    layer = copy.deepcopy(lm.model.layers[0])
    for name, module in layer.named_modules():
        ref = pristine.get_submodule(name)
        assert module.__dict__.keys() == ref.__dict__.keys(), name
        assert not any(k.startswith("_sloth") or k in ("__deepcopy__", "__reduce_ex__") for k in module.__dict__)
    assert layer.gradient_checkpointing is False
    perturb_lora(layer)
    x = torch.randn(2, 5, 64)
    for name in ("mlp", "self_attn.o_proj", "self_attn.q_proj"):
        module = layer.get_submodule(name)
        torch.testing.assert_close(module(x), type(module).forward(module, x), rtol=0, atol=0)
        assert not torch.allclose(module(x), lm.model.layers[0].get_submodule(name)(x))
    shallow = copy.copy(lm.model.layers[0].mlp)
    assert "forward" not in shallow.__dict__ and shallow.down_proj is lm.model.layers[0].mlp.down_proj


def _instance_state(model):
    return {(name, key): value for name, module in model.named_modules() for key, value in module.__dict__.items()}


def test_unpatch_after_copying_leaves_both_models_exact():
    model = peft_model("llama").train()
    before = _instance_state(model)
    sloth.patch(model)
    resolve_causal_lm(model)._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=CHECKPOINT)
    dup = copy.deepcopy(model)
    loaded = _pickled(model)
    shallow = copy.copy(resolve_causal_lm(model))
    assert sloth.get_state(shallow) is None and "forward" not in shallow.__dict__
    assert shallow.model is resolve_causal_lm(model).model

    assert sloth.unpatch(model) and sloth.unpatch(dup) and sloth.unpatch(loaded)
    # unpatch replays the framework's request: the models must look like an unpatched model that got it
    control = peft_model("llama").train()
    resolve_causal_lm(control)._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=CHECKPOINT)
    want = _instance_state(control)
    after = _instance_state(model)
    assert all(after[k] is before[k] for k in before if k[1] not in ("gradient_checkpointing",
                                                                       "_gradient_checkpointing_func"))
    for other in (model, dup, loaded):
        state = _instance_state(other)
        assert state.keys() == want.keys()
        assert all(state[k] == want[k] for k in want if k[1] == "gradient_checkpointing")
    ids, labels = batch(model.config.vocab_size)
    want = outputs(model, ids, labels)
    assert_same(outputs(dup, ids, labels), want)
    assert_same(outputs(loaded, ids, labels), want)


def test_copies_of_a_patched_config():
    """attention="sloth" sets the config's implementation: copies get their own config, patched or not."""
    model = tiny_model("llama")
    original = model.config._attn_implementation
    sloth.patch(model, attention="sloth", gradient_checkpointing="off")
    for dup in (copy.deepcopy(model), _pickled(model)):
        assert dup.config is not model.config and dup.config._attn_implementation == "sloth"
        assert f"model's {original}" in str(sloth.get_state(dup).report)
        sloth.unpatch(dup)
        assert dup.config._attn_implementation == original and model.config._attn_implementation == "sloth"
    assert copy.deepcopy(model.model.layers[0]).self_attn.config._attn_implementation == original
