"""Every way of asking autograd for gradients, on a patched model against the unpatched one.

Trainers call ``loss.backward()``; other code calls ``backward(inputs=...)``,
``torch.autograd.grad`` (meta-learning, gradient penalties, per-adapter updates) or backs
through one graph twice. Each checkpointing mode must give the unpatched model's gradients
(fp32, same weights, same RNG) or a clear error, never missing gradients.
"""
import pytest
import torch
from peft import LoraConfig, get_peft_model

import sloth_plugins as sloth
from sloth_plugins.testing import tiny_model

FAMILIES = ("llama", "qwen3")
MODES = ("off", "recompute", "offload", "auto")
CHECKPOINTED = ("recompute", "offload", "auto")
VOCAB = 128


def _model(family, peft, **overrides):
    model = tiny_model(family, seed=0, layers=2, vocab_size=VOCAB, **overrides)
    if peft:
        torch.manual_seed(1)
        # init_lora_weights=False: lora_B is not zero, so every LoRA matrix gets a non-zero gradient
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=peft, lora_dropout=0.0,
                                                 init_lora_weights=False))
    model.train()
    return model


def _pair(family, mode, peft="all-linear", **overrides):
    """(unpatched, patched) models with identical weights."""
    reference, patched = _model(family, peft, **overrides), _model(family, peft, **overrides)
    if mode == "auto":      # auto without a device budget recomputes when the framework asks
        patched.gradient_checkpointing_enable()
    sloth.patch(patched, sloth.SlothConfig(kernels=False, gradient_checkpointing=mode))
    return reference, patched


def _batch(seed=0):
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, labels=ids)


def _loss(model, seed=0):
    torch.manual_seed(123)      # the same dropout masks in both models
    return model(**_batch(seed)).loss


def _lora(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def _assert_close(got, expected):
    assert got is not None and expected is not None
    error = (got - expected).norm() / expected.norm().clamp_min(1e-30)
    assert error < 2e-6, f"relative error {error:.2e}"


def _assert_all_close(got, expected):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g is not None, f"gradient {i} of {len(got)} missing"
        _assert_close(g, e)


def _grads(params):
    return [p.grad for p in params]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_backward(family, mode):
    reference, patched = _pair(family, mode)
    for model in (reference, patched):
        _loss(model).backward()
    _assert_all_close(_grads(_lora(patched)), _grads(_lora(reference)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_backward_inputs_lora_params(family, mode):
    reference, patched = _pair(family, mode)
    assert len(_lora(patched)) == 28       # 2 layers x 7 linears x (A, B)
    for model in (reference, patched):
        _loss(model).backward(inputs=_lora(model))
    _assert_all_close(_grads(_lora(patched)), _grads(_lora(reference)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_backward_inputs_a_subset_leaves_the_rest_alone(family, mode):
    reference, patched = _pair(family, mode)
    chosen = slice(3, 25, 5)        # some of each layer's LoRA matrices
    for model in (reference, patched):
        _loss(model).backward(inputs=_lora(model)[chosen])
    _assert_all_close(_grads(_lora(patched)[chosen]), _grads(_lora(reference)[chosen]))
    assert sum(p.grad is not None for p in patched.parameters()) == len(_lora(patched)[chosen])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_autograd_grad_allow_unused(family, mode):
    reference, patched = _pair(family, mode)
    expected = torch.autograd.grad(_loss(reference), _lora(reference), allow_unused=True)
    got = torch.autograd.grad(_loss(patched), _lora(patched), allow_unused=True)
    _assert_all_close(got, expected)
    assert all(p.grad is None for p in patched.parameters())       # autograd.grad leaves .grad alone


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_autograd_grad_of_a_subset(family, mode):
    reference, patched = _pair(family, mode)
    chosen = [0, 13, 14, 27]        # first and last LoRA matrices of each layer
    expected = torch.autograd.grad(_loss(reference), [_lora(reference)[i] for i in chosen])
    got = torch.autograd.grad(_loss(patched), [_lora(patched)[i] for i in chosen])
    _assert_all_close(got, expected)
    assert all(p.grad is None for p in patched.parameters())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_accumulation_over_two_micro_batches(family, mode):
    reference, patched = _pair(family, mode)
    for model in (reference, patched):
        _loss(model, seed=0).backward(inputs=_lora(model))
        _loss(model, seed=1).backward(inputs=_lora(model))
    _assert_all_close(_grads(_lora(patched)), _grads(_lora(reference)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tune_backward_inputs(family, mode):
    reference, patched = _pair(family, mode, peft=None)

    def chosen(model):
        layers = model.model.layers
        return [layers[0].mlp.down_proj.weight, layers[1].self_attn.q_proj.weight,
                layers[1].post_attention_layernorm.weight, model.model.embed_tokens.weight]

    for model in (reference, patched):
        _loss(model).backward(inputs=chosen(model))
    _assert_all_close(_grads(chosen(patched)), _grads(chosen(reference)))
    assert sum(p.grad is not None for p in patched.parameters()) == 4


@pytest.mark.parametrize("mode", CHECKPOINTED)
def test_dropout_is_replayed_for_autograd_grad(mode):
    reference, patched = _pair("llama", mode, attention_dropout=0.3)
    expected = torch.autograd.grad(_loss(reference), _lora(reference))
    got = torch.autograd.grad(_loss(patched), _lora(patched))
    _assert_all_close(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", [False, True], ids=["fused-head", "lora-head"])
def test_a_second_backward_without_checkpointing_doubles_exactly(family, head):
    # "lora-head": the head is a LoRA module, so the loss is the chunked CE that recomputes its chunks
    reference, patched = _pair(family, "off", peft=["q_proj", "down_proj"] + (["lm_head"] if head else []))
    for model in (reference, patched):
        loss = _loss(model)
        loss.backward(retain_graph=True)
        loss.backward()
    _assert_all_close(_grads(_lora(patched)), _grads(_lora(reference)))
    once = torch.autograd.grad(_loss(reference), _lora(reference))
    _assert_all_close(_grads(_lora(reference)), [2 * g for g in once])


@pytest.mark.parametrize("mode", CHECKPOINTED)
def test_a_second_backward_through_checkpointed_layers_raises_a_clear_error(mode):
    _, patched = _pair("llama", mode)
    loss = _loss(patched)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


@pytest.mark.parametrize("mode", CHECKPOINTED)
def test_create_graph_through_checkpointed_layers_raises_a_clear_error(mode):
    _, patched = _pair("llama", mode)
    with pytest.raises(RuntimeError, match="create_graph.*gradient_checkpointing='off'"):
        torch.autograd.grad(_loss(patched), _lora(patched), create_graph=True)


def test_create_graph_through_the_fused_loss_raises_a_clear_error():
    _, patched = _pair("llama", "off")
    with pytest.raises(RuntimeError, match="create_graph.*loss='off'"):
        torch.autograd.grad(_loss(patched), _lora(patched), create_graph=True)


def test_the_setting_the_create_graph_errors_name_gives_exact_second_order_gradients():
    reference, patched = _model("llama", "all-linear", attn_implementation="eager"), \
        _model("llama", "all-linear", attn_implementation="eager")     # SDPA on CPU has no double backward
    sloth.patch(patched, sloth.SlothConfig(gradient_checkpointing="off", loss="off", kernels=False))
    results = []
    for model in (reference, patched):
        grads = torch.autograd.grad(_loss(model), _lora(model), create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        results.append(torch.autograd.grad(penalty, _lora(model)[:4]))
    _assert_all_close(results[1], results[0])
