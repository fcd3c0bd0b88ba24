"""The hostile probe's OK cases, kept standing: every family of the table and three unknown ones.

Each case builds the same tiny model twice (same seed), patches one with the default config
and compares it with the other, unpatched, numerically (fp32): a training step's loss and
gradients (padding, masked labels, gradient checkpointing on), eval logits, greedy generation,
merge, patch/unpatch/patch. Whatever sloth decides to patch on an unknown family, the numbers
must be the unpatched model's, and what the report calls patched must exist.
"""
import copy
import warnings

import pytest
import torch

import sloth_plugins as sloth
from sloth_plugins.testing import FAMILIES, MOE_FAMILIES, probe_model, with_lora
from sloth_plugins.testing import UNKNOWN_FAMILIES as UNKNOWN

TOL = dict(rtol=1e-5, atol=1e-6)


def pair(family, seed=0, peft=True, **lora_kw):
    models = []
    for _ in range(2):
        m = probe_model(family, seed=seed)
        models.append(with_lora(m, **lora_kw) if peft else m)
    return models


def batch(vocab, seed=1, rows=3, width=14):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, width - 5:] = 0                       # right padding on one row
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :4] = -100                          # a masked prompt
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def step(model, inputs, seed=0):
    torch.manual_seed(seed)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_step(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, **TOL)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def eval_logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def greedy(model, inputs, tokens=6):
    model.eval()
    prompt = inputs["input_ids"][:1, :6]
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                          do_sample=False, pad_token_id=0)


def instance_state(model):
    return {(name, key): value for name, module in model.named_modules()
            for key, value in module.__dict__.items()
            if key in ("forward", "gradient_checkpointing", "_gradient_checkpointing_func")}


def report_is_true(report, model):
    """Every path the report names as patched exists in the model."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = dict(lm.named_modules())
    for entry in report.entries:
        if entry.patched and entry.path:
            assert entry.path in names, f"report names {entry.path!r}, which the model does not have"


EXPERT_LORA = dict(target_parameters=["experts.gate_up_proj", "experts.down_proj"])


@pytest.mark.parametrize("family,lora_kw", [(f, {}) for f in FAMILIES + MOE_FAMILIES + UNKNOWN]
                         + [(f, EXPERT_LORA) for f in MOE_FAMILIES],
                         ids=list(FAMILIES + MOE_FAMILIES + UNKNOWN) + [f"{f}-expert-lora" for f in MOE_FAMILIES])
def test_probe(family, lora_kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # PEFT: the default alpha pattern names expert weights not targeted
        ref, model = pair(family, **lora_kw)
    for m in (ref, model):
        m.gradient_checkpointing_enable()
    inputs = batch(model.config.vocab_size)
    state_before = instance_state(model)
    with pytest.warns(UserWarning) if family in UNKNOWN else _no_context():
        report = sloth.patch(model)
    report_is_true(report, model)
    if family in FAMILIES + MOE_FAMILIES:
        assert report.architecture is not None and report.count("loss") == 1, report

    assert_same_step(step(model, inputs), step(ref, inputs))
    torch.testing.assert_close(eval_logits(model, inputs), eval_logits(ref, inputs), **TOL)
    assert torch.equal(greedy(model, inputs), greedy(ref, inputs))

    # unpatch is exact, and patching again gives the same numbers
    assert sloth.unpatch(model)
    assert instance_state(model) == state_before
    with pytest.warns(UserWarning) if family in UNKNOWN else _no_context():
        sloth.patch(model)
    assert_same_step(step(model, inputs), step(ref, inputs))

    # merging the adapters of the patched model gives the unpatched merged model
    merged, ref_merged = model.merge_and_unload(), ref.merge_and_unload()
    torch.testing.assert_close(eval_logits(merged, inputs), eval_logits(ref_merged, inputs), **TOL)


class _no_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt"])
def test_nan_propagates(family):
    """A NaN in the weights must surface as a NaN loss, as it does without sloth."""
    ref, model = pair(family)
    inputs = batch(model.config.vocab_size)
    for m in (ref, model):
        with torch.no_grad():
            m.get_input_embeddings().weight[inputs["input_ids"][0, 3]] = float("nan")
    with pytest.warns(UserWarning) if family in UNKNOWN else _no_context():
        sloth.patch(model)
    ref.train(), model.train()
    assert torch.isnan(ref(**inputs).loss) and torch.isnan(model(**inputs).loss)


@pytest.mark.parametrize("lora_kw", [dict(use_dora=True), dict(use_rslora=True),
                                     dict(modules_to_save=["lm_head"]), dict(lora_dropout=0.1)],
                         ids=["dora", "rslora", "modules_to_save", "dropout"])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_lora_variants(family, lora_kw):
    ref, model = pair(family, **lora_kw)
    inputs = batch(model.config.vocab_size)
    report = sloth.patch(model)
    report_is_true(report, model)
    torch.manual_seed(5)
    a = step(model, inputs)
    torch.manual_seed(5)
    assert_same_step(a, step(ref, inputs))
    torch.testing.assert_close(eval_logits(model, inputs), eval_logits(ref, inputs), **TOL)


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2"])
def test_tied_head(family):
    ref, model = (with_lora(probe_model(family, seed=0, tie_word_embeddings=True)) for _ in range(2))
    inputs = batch(model.config.vocab_size)
    sloth.patch(model)
    assert_same_step(step(model, inputs), step(ref, inputs))


def test_full_finetune_two_models_and_repatch():
    """Two patched models at once, full fine-tuning: neither sees the other's state."""
    ref_a, a = pair("llama", seed=0, peft=False)
    ref_b, b = pair("qwen3", seed=3, peft=False)
    sloth.patch(a, gradient_checkpointing="recompute")
    sloth.patch(b)
    inputs = batch(384)
    for _ in range(2):
        assert_same_step(step(a, inputs), step(ref_a, inputs))
        assert_same_step(step(b, inputs), step(ref_b, inputs))
        for m in (a, b, ref_a, ref_b):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(p.grad if p.grad is not None else 0, alpha=-1e-2)


def test_torch_compile():
    ref, model = pair("llama")
    inputs = batch(model.config.vocab_size)
    sloth.patch(model)
    compiled = torch.compile(model, backend="aot_eager")
    loss, grads = step(compiled, inputs)
    assert_same_step((loss, {n.removeprefix("_orig_mod."): g for n, g in grads.items()}), step(ref, inputs))


def test_evaluate_predict_and_resume_with_the_hf_trainer(tmp_path):
    """Trainer.evaluate / predict with compute_metrics, and resume from a checkpoint, patched vs not."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 384, (12,), generator=g).tolist() for _ in range(16)]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})

    def metrics(pred):
        logits, labels = pred.predictions, pred.label_ids
        return {"acc": float((logits[:, :-1].argmax(-1) == labels[:, 1:]).mean())}

    def run(patched, out, steps, resume=None):
        model = with_lora(probe_model("llama"))
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                 learning_rate=1e-3, save_strategy="steps", save_steps=2, report_to=[],
                                 use_cpu=True, seed=0, data_seed=0, logging_steps=1, disable_tqdm=True)
        callbacks = [sloth.SlothCallback(verbose=False)] if patched else []
        trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                          compute_metrics=metrics, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return trainer, losses

    # HF's resume is not bit-equal to an uninterrupted run by itself: compare resumed with resumed
    run(False, tmp_path / "ref", 2)
    ref_trainer, ref_losses = run(False, tmp_path / "ref", 4, resume=True)
    run(True, tmp_path / "sloth", 2)
    trainer, losses = run(True, tmp_path / "sloth", 4, resume=True)
    assert len(losses) == 4 and losses == pytest.approx(ref_losses, rel=1e-6)
    # Adam turns fp32 rounding of near-zero gradients (the fused LoRA sums in another order) into a few 1e-6
    # weight differences, which depend on the CPU's kernels: the trained weights get a band of their own,
    # and evaluate / predict are compared on the same weights, where they must agree to fp32 rounding.
    trained = dict(trainer.model.named_parameters())
    with torch.no_grad():
        for name, ref_param in ref_trainer.model.named_parameters():
            if ref_param.requires_grad:
                torch.testing.assert_close(trained[name], ref_param, rtol=0, atol=2e-5)
                ref_param.copy_(trained[name])
    ev, ref_ev = trainer.evaluate(), ref_trainer.evaluate()
    assert ev["eval_loss"] == pytest.approx(ref_ev["eval_loss"], rel=1e-5)
    assert ev["eval_acc"] == ref_ev["eval_acc"]
    pred, ref_pred = trainer.predict(data), ref_trainer.predict(data)
    torch.testing.assert_close(torch.as_tensor(pred.predictions), torch.as_tensor(ref_pred.predictions), **TOL)


def test_copy_of_an_unpatched_pair_is_not_a_test_artifact():
    """The pair helper really builds equal, independent models (a broken helper would hide bugs)."""
    ref, model = pair("llama")
    inputs = batch(384)
    assert_same_step(step(model, inputs), step(ref, inputs))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    assert not torch.allclose(step(model, inputs)[0], step(ref, inputs)[0])
    assert copy.deepcopy(ref) is not ref
