"""Padding-free training: the collator, the attention plugin and its config keys.

The central check: the same samples, once padded into a batch and once concatenated into one
row by ``PaddingFreeCollator``, give the same summed loss and the same gradients, whichever
attention keeps the samples apart (the model's SDPA, sloth's reference, sloth's Triton kernel
under the interpreter).
"""
import pytest
import torch

import sloth_plugins as sloth
from sloth_plugins.integrations.collators import PaddingFreeCollator
from sloth_plugins.kernels import attention as attention_kernels
from sloth_plugins.plugins import attention as attention_plugin
from sloth_plugins.testing import tiny_model

LENGTHS = [5, 11, 3, 8]
ONLY_ATTENTION = dict(kernels=False, loss="off", gradient_checkpointing="off")


def _samples(vocab=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[:2] = -100                              # a "prompt" that is not trained on
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def _padded(samples):
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(s["input_ids"]), 1, torch.tensor(s["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    # num_items_in_batch=1: the summed loss, so padded and packed compare token for token
    loss = model(**batch, num_items_in_batch=torch.tensor(1)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=tol, atol=tol, msg=name)


def test_collator_flattens_with_restarting_positions_and_boundary_labels():
    samples = _samples()
    batch = PaddingFreeCollator()(samples)
    total = sum(LENGTHS)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    starts = [0, 5, 16, 19]
    assert batch["cu_seq_lens_q"].tolist() == starts + [total] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 11
    assert batch["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]
    labels = batch["labels"][0]
    assert all(labels[s] == -100 for s in starts)
    flat = [t for s in samples for t in s["labels"][1:]]
    assert [x for i, x in enumerate(labels.tolist()) if i not in starts] == flat


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_padding_free_equals_padded_with_the_models_own_attention(family):
    samples = _samples()
    model = tiny_model(family).train()
    padded = _loss_and_grads(model, _padded(samples))
    packed = _loss_and_grads(model, PaddingFreeCollator()(samples))
    _assert_same(padded, packed, 1e-5)
    # and with every sloth patch (kernels, chunked loss; attention 'auto' keeps the model's on CPU)
    report = sloth.patch(model, padding_free=True)
    assert report.count("attention") == 0 and "keeps the model's" in str(report)
    _assert_same(padded, _loss_and_grads(model, PaddingFreeCollator()(samples)), 1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "phi3"])
def test_padding_free_equals_padded_with_sloth_attention(family):
    samples = _samples()
    extra = dict(sliding_window=6) if family == "mistral" else {}
    model = tiny_model(family, **extra).train()
    padded = _loss_and_grads(model, _padded(samples))
    report = sloth.patch(model, attention="sloth", padding_free=True)
    assert report.count("attention") == 1 and model.config._attn_implementation == "sloth"
    calls = []
    original = attention_plugin._kernel
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_plugin, "_kernel", lambda *a: calls.append(1) or original(*a))
        _assert_same(padded, _loss_and_grads(model, PaddingFreeCollator()(samples)), 1e-5)
        _assert_same(padded, _loss_and_grads(model, _padded(samples)), 1e-5)
    assert len(calls) == 2 * model.config.num_hidden_layers
    sloth.unpatch(model)
    assert model.config._attn_implementation != "sloth"


def test_padding_free_with_the_triton_kernel_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(attention_kernels, "_triton_enabled", lambda *tensors: True)
    launched = []
    from sloth_plugins.kernels import _attention_triton
    real = _attention_triton._forward
    monkeypatch.setattr(_attention_triton, "_forward", lambda *a: launched.append(1) or real(*a))
    samples = _samples()
    model = tiny_model("llama").train()
    padded = _loss_and_grads(model, _padded(samples))
    sloth.patch(model, attention="sloth", padding_free=True)
    _assert_same(padded, _loss_and_grads(model, PaddingFreeCollator()(samples)), 2e-5)
    assert len(launched) == model.config.num_hidden_layers


def test_hf_trainer_padding_free_run_matches_the_padded_run(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = _samples(seed=1) + _samples(seed=2) + _samples(seed=3)

    class Losses(TrainerCallback):
        def __init__(self):
            self.values = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.values.append(logs["loss"])

    def train(collator, callbacks):
        model = tiny_model("llama", seed=3)
        args = TrainingArguments(output_dir=str(tmp_path / str(len(callbacks))), max_steps=3, learning_rate=1e-2,
                                 per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                                 remove_unused_columns=False, disable_tqdm=True)
        losses = Losses()
        Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                callbacks=[losses, *callbacks]).train()
        return losses.values

    padded = train(_padded, [])
    callback = sloth.SlothCallback(attention="sloth", padding_free=True, verbose=False)
    packed = train(PaddingFreeCollator(), [callback])
    assert callback.report.count("attention") == 1 and callback.report.count("loss") == 1
    assert len(packed) == len(padded) == 3 and packed == pytest.approx(padded, rel=1e-5)


def test_calls_the_kernel_cannot_take_run_the_models_own_attention():
    model = tiny_model("llama").eval()
    ids = torch.randint(3, 384, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    logits = model(input_ids=ids, attention_mask=mask).logits
    sloth.patch(model, attention="sloth", **ONLY_ATTENTION)
    # left-padded prefill takes the kernel (padding dropped), decoding with a cache the model's sdpa
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                               logits[mask.bool()], rtol=1e-5, atol=1e-5)
    # attention dropout in training: the model's own attention
    model.train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_plugin, "_kernel", lambda *a: pytest.fail("dropout must not reach the kernel"))
        model(input_ids=ids)


def test_auto_takes_the_kernel_only_for_packed_batches_it_measured_faster(monkeypatch):
    monkeypatch.setattr(attention_plugin, "_kernel_device", lambda device: True)
    monkeypatch.setattr(attention_kernels, "_triton_enabled", lambda *tensors: True)
    timings = {}
    monkeypatch.setattr(attention_plugin, "_measure", lambda *a: timings["value"])
    samples = _samples()
    model = tiny_model("llama").train()
    padded = _loss_and_grads(model, _padded(samples))
    model_packed = _loss_and_grads(model, PaddingFreeCollator()(samples))
    report = sloth.patch(model, attention="auto", **ONLY_ATTENTION)
    assert report.count("attention") == 1 and "auto" in str(report)
    kernel_calls = []
    original = attention_plugin._kernel
    monkeypatch.setattr(attention_plugin, "_kernel", lambda *a: kernel_calls.append(1) or original(*a))

    # not packed: never measured (no timings yet: a measurement would raise KeyError)
    _assert_same(padded, _loss_and_grads(model, _padded(samples)), 1e-6)
    assert not kernel_calls
    timings["value"] = (2.0, 1.0)                                           # the model's sdpa wins
    _assert_same(model_packed, _loss_and_grads(model, PaddingFreeCollator()(samples)), 1e-6)
    assert not kernel_calls and "-> model's sdpa" in report.notes[-1]

    sloth.unpatch(model)
    report = sloth.patch(model, attention="auto", **ONLY_ATTENTION)
    timings["value"] = (1.0, 2.0)                                           # the kernel wins
    _assert_same(padded, _loss_and_grads(model, PaddingFreeCollator()(samples)), 2e-5)
    assert len(kernel_calls) == model.config.num_hidden_layers
    assert "-> sloth kernel" in report.notes[-1]


def test_auto_measures_inside_a_checkpointed_layer(monkeypatch):
    # The first packed call measures both paths (fwd + bwd) inside layer 0's forward, which runs
    # under non-reentrant checkpointing: the measurement must not leak into the checkpoint.
    monkeypatch.setattr(attention_plugin, "_kernel_device", lambda device: True)
    monkeypatch.setattr(attention_kernels, "_triton_enabled", lambda *tensors: True)
    times = iter([1.0, 2.0])                           # each path runs once (fwd + bwd): the kernel wins
    monkeypatch.setattr(attention_plugin, "_time_ms", lambda fn, device: fn() or next(times))
    samples = _samples()
    model = tiny_model("llama").train()
    padded = _loss_and_grads(model, _padded(samples))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = sloth.patch(model, attention="auto", **ONLY_ATTENTION)
    _assert_same(padded, _loss_and_grads(model, PaddingFreeCollator()(samples)), 2e-5)
    assert any("packed batch of 27 tokens in 4 samples" in n for n in report.notes), report.notes


def test_unpatch_restores_the_attention_implementation():
    model = tiny_model("qwen2")
    before = model.config._attn_implementation
    sloth.patch(model, attention="sloth")
    assert model.config._attn_implementation == "sloth"
    assert all(layer.self_attn.config._attn_implementation == "sloth" for layer in model.model.layers)
    sloth.patch(model, attention="sdpa")                 # another config: the old patches go first
    assert model.config._attn_implementation == before
    sloth.unpatch(model)
    assert model.config._attn_implementation == before and "_attn_implementation" not in model.config.to_dict()


def test_sloth_attention_on_an_unknown_family_falls_back_and_strict_raises():
    from transformers import AutoModelForCausalLM, GPT2Config
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50,
                                                        bos_token_id=0, eos_token_id=0))
    with pytest.warns(UserWarning):
        report = sloth.patch(model, attention="sloth", loss="off")
    assert report.count("attention", patched=False) == 1
    assert model.config._attn_implementation != "sloth"


def test_config_keys():
    config = sloth.SlothConfig()
    assert config.attention == "auto" and config.padding_free is False
    assert sloth.SlothConfig(attention="sloth", padding_free=True).to_dict()["padding_free"] is True
    with pytest.raises(sloth.SlothConfigError, match="attention must be one of auto, sloth, sdpa"):
        sloth.SlothConfig(attention="flash")
    with pytest.raises(sloth.SlothConfigError, match="padding_free must be true or false"):
        sloth.SlothConfig(padding_free="yes")


# ----------------------------------------------------------------------------- GPU (H200)

def _gpu_model(**overrides):
    kw = dict(hidden_size=2048, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4, layers=2,
              vocab_size=1024)
    kw.update(overrides)
    layers = kw.pop("layers")
    return tiny_model("llama", dtype=torch.bfloat16, layers=layers, **kw).cuda().train()


def _gpu_samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [700, 33, 1500, 260, 7, 900]
    return [{"input_ids": torch.randint(3, 1024, (n,), generator=g).tolist()} for n in lengths]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cuda(batch):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.gpu
def test_gpu_padding_free_sloth_kernel_matches_padded_sdpa():
    samples = _gpu_samples()
    model = _gpu_model()
    padded = _loss_and_grads(model, _cuda(_padded([dict(s, labels=s["input_ids"]) for s in samples])))
    report = sloth.patch(model, attention="sloth", padding_free=True)
    assert "Triton varlen kernel" in str(report)
    packed = _loss_and_grads(model, _cuda(PaddingFreeCollator()(samples)))
    assert abs(packed[0].item() - padded[0].item()) <= 1e-2 * abs(padded[0].item())
    for name in padded[1]:
        assert _rel(packed[1][name], padded[1][name]) <= 3e-2, name


@pytest.mark.gpu
def test_gpu_auto_measures_and_reports_its_decision():
    samples = _gpu_samples(1)
    model = _gpu_model()
    report = sloth.patch(model, attention="auto", padding_free=True, kernels=False, loss="off",
                         gradient_checkpointing="off")
    assert report.count("attention") == 1
    loss, _ = _loss_and_grads(model, _cuda(PaddingFreeCollator()(samples)))
    assert torch.isfinite(loss)
    decisions = [n for n in report.notes if n.startswith("attention='auto': packed batch")]
    assert len(decisions) == 1 and ("-> sloth kernel" in decisions[0] or "-> model's sdpa" in decisions[0])
    print(decisions[0])


def test_sloth_loss_needs_no_use_cache_flag_for_packed_rows():
    """transformers reads packed samples from restarting position ids only without a KV cache;
    the patched training forward turns the cache off itself, so a collator that does not set
    use_cache (transformers' own DataCollatorWithFlattening) still keeps samples apart."""
    samples = _samples()
    model = tiny_model("llama").train()
    padded = _loss_and_grads(model, _padded(samples))
    sloth.patch(model, kernels=False, gradient_checkpointing="off")
    packed = PaddingFreeCollator()(samples)
    packed.pop("use_cache")
    _assert_same(padded, _loss_and_grads(model, packed), 1e-5)
