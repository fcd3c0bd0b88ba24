"""Vision-language families (issue 19): the language model gets the table's treatment, the vision
tower is checkpointed (and patched where the table knows its modules), and every number is the
unpatched model's.

Each case builds the same tiny model twice (same seed; a 1-2 layer vision tower on tiny images, an
image+text batch whose image-token count matches the tower's output), patches one and compares
(fp32): a training step's loss and gradients with LoRA (PEFT) and with full fine-tuning, the vision
tower frozen or trained, labels masked at image tokens (as HF processors' collators do) or not,
padding; greedy generation with the image; adapters saved from the patched model loaded in plain
PEFT. Families missing from the installed transformers are skipped.
"""
import pytest
import torch

import sloth_plugins as sloth
from sloth_plugins.plugins import loss_semantics as semantics
from sloth_plugins.testing import VL_FAMILIES, tiny_vl_model, vl_batch, with_lora

TOL = dict(rtol=1e-5, atol=1e-6)
FAMILIES = [f for f in VL_FAMILIES if f != "llama4"]
# what the language model of each family must get patched (the table's promise), per installed transformers
LANGUAGE_KINDS = ("rms_norm", "rope", "lora_mlp", "gradient_checkpointing", "loss")


def _model(family, **kw):
    import transformers
    if not hasattr(transformers, VL_FAMILIES[family]):
        pytest.skip(f"this transformers has no {VL_FAMILIES[family]}")
    return tiny_vl_model(family, **kw)


def _step(model, inputs, seed=0):
    torch.manual_seed(seed)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=2e-6, atol=2e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        # fp32 rounding scales with the tensor (Gemma 3's projector gradients reach ~3e3 on random images):
        # the absolute tolerance is 2e-6 of its largest entry, 10x below what a wrong softcap gave (2e-4)
        scale = float(grads_b[name].abs().max())
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=max(1e-6, 2e-6 * scale), msg=name)


def _report_is_true(report, model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = dict(lm.named_modules())
    for entry in report.entries:
        if entry.patched and entry.path:
            assert entry.path in names, f"report names {entry.path!r}, which the model does not have"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_step_matches_unpatched_and_adapters_load_in_plain_peft(family, tmp_path):
    ref, model = (with_lora(_model(family)) for _ in range(2))
    inputs = vl_batch(family)
    report = sloth.patch(model, gradient_checkpointing="recompute")
    _report_is_true(report, model)
    assert report.architecture is not None
    for kind in LANGUAGE_KINDS:
        assert report.count(kind) > 0, (kind, str(report))
    assert report.count("loss", patched=False) == 0, report
    # the vision tower's layers are checkpointed too (Mllama's vision layers are not checkpointing layers)
    checkpointed = [e.path for e in report.entries if e.kind == "gradient_checkpointing" and e.patched]
    assert any(".language_model." in p for p in checkpointed)
    if family != "mllama":
        assert any(".language_model." not in p for p in checkpointed), checkpointed
    assert report.count("lora_mlp") + report.count("lora_qkv") > 0, report   # fused LoRA on the language model

    _assert_same(_step(model, inputs), _step(ref, inputs))
    assert "verified equal" in report.summary()["loss"]["how"][0]
    _assert_same(_step(model, inputs, seed=1), _step(ref, inputs, seed=1))   # second step: no verification

    # the patched model's adapters load in plain PEFT (no sloth) and give the same logits
    from peft import PeftModel
    model.save_pretrained(str(tmp_path / "adapter"))
    plain = PeftModel.from_pretrained(_model(family), str(tmp_path / "adapter")).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**_no_labels(inputs)).logits, plain(**_no_labels(inputs)).logits, **TOL)


def _no_labels(inputs):
    return {k: v for k, v in inputs.items() if k != "labels"}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_matches_unpatched(family):
    """Every weight trains (the vision tower too; the LoRA case above has it frozen under its adapters);
    labels on image tokens and padding, which the model's own loss counts, so ours must; the Trainer's
    num_items_in_batch, which some classes' own loss ignores, so ours must too."""
    ref, model = _model(family), _model(family)
    inputs = vl_batch(family, mask_image_labels=False)
    inputs["labels"] = inputs["input_ids"].clone()
    inputs["num_items_in_batch"] = torch.tensor(7)
    for m in (ref, model):
        m.gradient_checkpointing_enable()
    before = _instance_state(model)
    report = sloth.patch(model)
    _report_is_true(report, model)
    _assert_same(_step(model, inputs), _step(ref, inputs))
    _assert_same(_step(model, inputs, seed=1), _step(ref, inputs, seed=1))
    assert sloth.unpatch(model) and _instance_state(model) == before      # unpatch is exact


def _instance_state(model):
    return {(name, key): value for name, module in model.named_modules() for key, value in module.__dict__.items()
            if key in ("forward", "gradient_checkpointing", "_gradient_checkpointing_func")}


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_an_image_is_unchanged(family):
    ref, model = _model(family), _model(family)
    sloth.patch(model)
    inputs = _no_labels(vl_batch(family, batch=1, pad=0))
    out = [m.eval().generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0) for m in (model, ref)]
    assert torch.equal(out[0], out[1])


def test_each_vision_language_family_is_a_row_of_the_table():
    from sloth_plugins.manager import architecture_table
    table = architecture_table()
    for family, cls in VL_FAMILIES.items():
        arch = table.lookup(family, cls)
        assert arch is not None and arch.vision, family
    # one model_type, two classes: the text-only CausalLM of a Llama-3.2-Vision checkpoint has its own row
    assert table.lookup("mllama", "MllamaForCausalLM").layers == "model.layers"
    assert table.lookup("mllama", "SomethingElse") is None


def test_padding_free_and_the_attention_kernel_stand_aside_for_vision_language_models():
    model = _model("qwen2_5_vl")
    report = sloth.patch(model, padding_free=True, attention="sloth")
    assert "vision-language" in report.fallbacks()["padding_free"][0]
    assert "vision-language" in report.fallbacks()["attention"][0]


def test_llama4_trains_with_its_own_loss_and_says_why():
    ref, model = _model("llama4"), _model("llama4")
    inputs = vl_batch("llama4")
    report = sloth.patch(model, gradient_checkpointing="recompute")
    why = report.fallbacks()["loss"][0]
    assert "Llama4ForConditionalGeneration has no decoder" in why and "own loss is kept" in why
    assert report.count("gradient_checkpointing") > 0 and report.count("rms_norm") > 0
    _assert_same(_step(model, inputs), _step(ref, inputs))


def test_doctor_builds_the_vision_language_class_and_lists_its_patches(tmp_path):
    import transformers

    from sloth_plugins.doctor import patch_report
    from sloth_plugins.manager import architecture_table
    from sloth_plugins.testing import tiny_vl_config
    for family, cls in VL_FAMILIES.items():
        if not hasattr(transformers, cls):
            continue
        tiny_vl_config(family).save_pretrained(str(tmp_path / family))
        report = patch_report(str(tmp_path / family), sloth.SlothConfig())
        assert report.architecture == architecture_table().lookup(family, cls).name
        lines = str(report)
        for kind in ("rms_norm", "gradient_checkpointing", "loss", "mlp"):
            assert kind in lines, (family, lines)


# ---- the model's own loss, read from its code --------------------------------------------------

class _Standard:
    def forward(self, logits, labels, **kwargs):
        return self.loss_function(logits=logits, labels=labels, vocab_size=3, **kwargs)


class _NoKwargs:
    def forward(self, logits, labels, **kwargs):
        return self.loss_function(logits=logits, labels=labels, vocab_size=3)


class _AttentionMasked:    # the shape of Gemma 3's and Llama 4's loss in transformers 5.16
    def forward(self, logits, labels, attention_mask=None):
        shift_logits, shift_labels = logits[..., :-1, :], labels[..., 1:]
        if attention_mask is not None:
            shift_attention_mask = attention_mask[:, -shift_logits.shape[1]:]
            shift_logits = shift_logits[shift_attention_mask != 0]
            shift_labels = shift_labels[shift_attention_mask != 0]
        loss_fct = torch.nn.CrossEntropyLoss()
        return loss_fct(shift_logits.reshape(-1, 3), shift_labels.reshape(-1))


class _Softcapped:
    def forward(self, logits, labels, **kwargs):
        logits = torch.tanh(logits / self.config.final_logit_softcapping) * self.config.final_logit_softcapping
        return self.loss_function(logits=logits, labels=labels, vocab_size=3, **kwargs)


class _Smoothed:
    def forward(self, logits, labels):
        return torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)


@pytest.mark.parametrize("cls, expected", [(_Standard, semantics.STANDARD), (_NoKwargs, semantics.MEAN),
                                           (_AttentionMasked, semantics.ATTENTION_MASKED_MEAN), (_Smoothed, None)])
def test_loss_semantics_are_read_from_the_forward(cls, expected):
    assert semantics.loss_semantics(cls)[0] == expected


def test_a_logit_softcap_the_table_does_not_know_is_a_fallback():
    assert semantics.loss_semantics(_Softcapped)[0] is None
    assert semantics.loss_semantics(_Softcapped, "final_logit_softcapping")[0] == semantics.STANDARD
    assert semantics.loss_semantics(_Standard, "final_logit_softcapping")[0] is None


def test_multimodal_rope_equals_transformers_own_where_it_has_one():
    """Qwen2.5-VL in transformers 5.16 calls apply_multimodal_rotary_pos_emb (newer ones merge the
    sections in the rotary embedding and call the plain function, patched as for text models)."""
    import importlib

    from sloth_plugins.plugins.kernel_patching import _sloth_apply_multimodal_rotary_pos_emb
    modeling = importlib.import_module("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    theirs = getattr(modeling, "apply_multimodal_rotary_pos_emb", None)
    if theirs is None:
        pytest.skip("this transformers merges the mrope sections before attention")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    cos, sin = torch.randn(3, 2, 7, 16, generator=g), torch.randn(3, 2, 7, 16, generator=g)
    for ours, ref in zip(_sloth_apply_multimodal_rotary_pos_emb(q, k, cos, sin, [2, 3, 3]),
                         theirs(q, k, cos, sin, [2, 3, 3])):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_hf_trainer_with_the_callback_matches_the_plain_trainer(tmp_path, family="gemma3"):
    """The HF Trainer (gradient accumulation, gradient checkpointing, its num_items_in_batch contract)
    on image+text rows, LoRA on the language model only: the vision tower frozen whole."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from sloth_plugins.testing import MicroLossRecorder

    class Recording(MicroLossRecorder, Trainer):
        pass

    rows = [{k: v[0] for k, v in vl_batch(family, batch=1, pad=0, seed=i).items()} for i in range(8)]

    def collate(batch):
        return {k: torch.stack([r[k] for r in batch]) for k in batch[0]}

    losses, reports = [], []
    for patched in (False, True):
        model = get_peft_model(_model(family), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                          target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj)"))
        args = TrainingArguments(output_dir=str(tmp_path / str(patched)), max_steps=2, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=2e-3, logging_steps=1, save_strategy="no",
                                 report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                                 gradient_checkpointing=True, disable_tqdm=True, remove_unused_columns=False)
        callbacks = [sloth.SlothCallback(verbose=False)] if patched else []
        trainer = Recording(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=callbacks)
        trainer.train()
        losses.append(trainer.micro_losses)
        reports += [c.report for c in callbacks]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
    assert reports[0].count("loss") == 1 and reports[0].count("gradient_checkpointing") > 2, reports[0]
