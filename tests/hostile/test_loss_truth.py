"""The loss sloth reports is the loss the model trains on (issue #15).

Every case is compared with the unpatched model in fp32; where sloth cannot prove its loss
equals the model's, it keeps the model's loss and the report says so.
"""
import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertLMHeadModel,
    GPT2Config,
    MixtralConfig,
    OlmoeConfig,
    OPTConfig,
    Qwen2MoeConfig,
    RobertaConfig,
    RobertaForCausalLM,
    Trainer,
    TrainingArguments,
)

import sloth_plugins as sloth
from sloth_plugins.testing import tiny_model

VOCAB = 96
FP32 = dict(rtol=1e-5, atol=1e-6)
_MOE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _mixtral(**kw):
    return AutoModelForCausalLM.from_config(MixtralConfig(**_MOE, num_local_experts=4, num_experts_per_tok=2, **kw))


def _qwen2_moe(**kw):
    return AutoModelForCausalLM.from_config(Qwen2MoeConfig(**_MOE, num_experts=4, num_experts_per_tok=2,
                                                           moe_intermediate_size=32,
                                                           shared_expert_intermediate_size=32, **kw))


def _olmoe(**kw):
    return AutoModelForCausalLM.from_config(OlmoeConfig(**_MOE, num_experts=4, num_experts_per_tok=2, **kw))


def _bert(**kw):
    return BertLMHeadModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, is_decoder=True, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, **kw))


def _roberta(**kw):
    return RobertaForCausalLM(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64, is_decoder=True,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw))


def _gpt2(**kw):
    return AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                                       bos_token_id=0, eos_token_id=0, **kw))


def _opt(**kw):
    return AutoModelForCausalLM.from_config(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                      ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                                                      max_position_embeddings=64, pad_token_id=0, **kw))


def _batch(seed=0, shape=(2, 12)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, shape, generator=g)
    return ids, ids.clone()


def _loss_and_grads(model, ids, labels, seed=0, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=labels, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training(model, report_check, steps=2, **kw):
    """Two training calls, unpatched then patched, fp32: same loss and same grads."""
    model.train()
    batches = [_batch(seed) for seed in range(steps)]
    refs = [_loss_and_grads(model, *b, seed=i, **kw) for i, b in enumerate(batches)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sloth.patch(model)
    for i, (b, (ref_loss, ref_grads)) in enumerate(zip(batches, refs)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss, grads = _loss_and_grads(model, *b, seed=i, **kw)
        torch.testing.assert_close(loss, ref_loss, **FP32)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    report_check(report)
    return report


def _loss_entry(report):
    (entry,) = [e for e in report.entries if e.kind == "loss"]
    return entry


# ---- 1. the generic path only keeps a loss it has proved --------------------------------------------

@pytest.mark.parametrize("build", [_mixtral, _qwen2_moe, _olmoe], ids=["mixtral", "qwen2_moe", "olmoe"])
def test_moe_router_aux_loss_is_kept(build):
    """Table MoE families (mixtral, qwen2_moe) get the chunked loss plus the model's own load-balancing
    loss; a MoE family without a table entry (olmoe) keeps the model's loss. Same numbers either way."""
    torch.manual_seed(0)
    model = build(output_router_logits=True)

    def check(report):
        entry = _loss_entry(report)
        if report.architecture is None:
            assert not entry.patched and "output_router_logits" in entry.detail
        else:
            assert entry.patched and "load-balancing" in entry.detail, entry

    _assert_same_training(model, check)


@pytest.mark.parametrize("build", [_mixtral, _olmoe], ids=["mixtral", "olmoe"])
def test_moe_router_logits_asked_per_call_run_the_models_forward(build):
    torch.manual_seed(0)
    model = build(output_router_logits=False)
    ids, labels = _batch()
    model.train()
    torch.manual_seed(0)
    ref = model(input_ids=ids, labels=labels, output_router_logits=True)
    assert ref.aux_loss is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sloth.patch(model)
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=labels, output_router_logits=True)
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    assert out.aux_loss is not None


@pytest.mark.parametrize("build", [_bert, _roberta], ids=["bert", "roberta"])
def test_head_transform_is_not_skipped(build):
    torch.manual_seed(0)
    model = build()

    def check(report):
        entry = _loss_entry(report)
        assert not entry.patched and "head" in entry.detail
        assert "fell back" in str(report)

    _assert_same_training(model, check)


@pytest.mark.parametrize("build", [_gpt2, _opt], ids=["gpt2", "opt"])
def test_plain_generic_families_keep_the_fast_path_once_verified(build):
    torch.manual_seed(0)
    model = build()          # GPT-2 keeps its dropout: the verification must see the same masks

    def check(report):
        entry = _loss_entry(report)
        assert entry.patched and "verified" in entry.detail and "first training step" in entry.detail

    report = _assert_same_training(model, check, steps=3)
    # Verified once: later training calls build no full logits.
    assert model(input_ids=_batch()[0], labels=_batch()[1]).logits is None
    assert "pending" not in str(report)


def test_generic_report_before_any_step_does_not_claim_proof():
    torch.manual_seed(0)
    model = _gpt2()
    with pytest.warns(UserWarning, match="no architecture entry"):
        report = sloth.patch(model)
    entry = _loss_entry(report)
    assert entry.patched and "pending" in entry.detail and "first training step" in entry.detail


def test_doctor_style_meta_model_reports_truthfully():
    with torch.device("meta"):
        bert = _bert()
        gpt2 = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bert_report = sloth.patch(bert)
        gpt2_report = sloth.patch(gpt2)
    assert not _loss_entry(bert_report).patched
    assert "pending" in _loss_entry(gpt2_report).detail


def test_generic_mismatch_falls_back_for_good_and_uses_the_models_loss():
    torch.manual_seed(0)
    model = _gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
    real_forward = type(model).forward

    def scaled_forward(self, *args, **kwargs):
        # A family whose forward changes the loss in code (no config flag sloth could read).
        out = real_forward(self, *args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss * 1.5
        return out

    model.__class__ = type("ScaledGPT2", (type(model),), {"forward": scaled_forward})
    ids, labels = _batch()
    ref = model(input_ids=ids, labels=labels).loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sloth.patch(model)
    with pytest.warns(UserWarning, match="sloth_plugins.*differs"):
        loss = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss, ref, **FP32)
    assert loss.requires_grad
    entry = _loss_entry(report)
    assert not entry.patched and "first training step" in entry.detail
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref, **FP32)
    assert out.logits is not None


def test_table_families_keep_todays_path():
    model = tiny_model("llama").train()
    report = sloth.patch(model)
    entry = _loss_entry(report)
    assert entry.patched and "verified" not in entry.detail and "pending" not in entry.detail
    ids, labels = _batch()
    assert model(input_ids=ids, labels=labels).logits is None


# ---- 2. the caller computes its own loss ------------------------------------------------------------

class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _smoothed_loss(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             label_smoothing=0.05)


def _trainer_losses(tmp_path, *, patched, **options):
    model = tiny_model("llama", vocab_size=VOCAB)
    args = TrainingArguments(output_dir=str(tmp_path / f"out-{patched}"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
                             label_smoothing_factor=options.pop("label_smoothing_factor", 0.0))
    callbacks = [sloth.SlothCallback(verbose=False)] if patched else []
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=callbacks, **options)
    losses = []
    step = trainer.training_step
    trainer.training_step = lambda *a, **k: losses.append(step(*a, **k).item()) or torch.tensor(losses[-1])
    trainer.train()
    return losses, (callbacks[0].report if patched else None)


def test_compute_loss_func_trains_the_same_and_the_report_says_so(tmp_path):
    ref, _ = _trainer_losses(tmp_path, patched=False, compute_loss_func=_smoothed_loss)
    losses, report = _trainer_losses(tmp_path, patched=True, compute_loss_func=_smoothed_loss)
    assert losses == pytest.approx(ref, rel=1e-5) and len(losses) == 3
    entry = _loss_entry(report)
    assert not entry.patched and "without labels" in entry.detail and "logits" in entry.detail


def test_label_smoothing_turns_the_loss_off_with_a_note(tmp_path):
    ref, _ = _trainer_losses(tmp_path, patched=False, label_smoothing_factor=0.1)
    losses, report = _trainer_losses(tmp_path, patched=True, label_smoothing_factor=0.1)
    assert losses == pytest.approx(ref, rel=1e-5) and len(losses) == 3
    assert report.count("loss") == 0
    assert any("label_smoothing_factor" in n for n in report.notes)


def test_training_forward_without_labels_flips_the_report_once():
    model = tiny_model("llama").train()
    report = sloth.patch(model)
    ids, _ = _batch()
    logits = model(input_ids=ids).logits
    assert logits is not None
    model(input_ids=ids)
    entry = _loss_entry(report)
    assert not entry.patched and "without labels" in entry.detail
    assert report.count("loss", patched=False) == 1
    with torch.no_grad():          # generation-style calls do not train on the logits
        other = tiny_model("llama").train()
        other_report = sloth.patch(other)
        other(input_ids=ids)
    assert _loss_entry(other_report).patched


# ---- 3. a batch without labels ----------------------------------------------------------------------

def test_all_ignored_labels_warn_once_and_stay_finite():
    model = tiny_model("llama").train()
    sloth.patch(model)
    ids, _ = _batch()
    labels = torch.full_like(ids, -100)
    with pytest.warns(UserWarning, match="sloth_plugins.*no labels"):
        out = model(input_ids=ids, labels=labels)
    assert out.loss.item() == 0.0
    out.loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model(input_ids=ids, labels=labels).loss.item() == 0.0


# ---- 4. labels that do not line up with the inputs -------------------------------------------------

@pytest.mark.parametrize("length", [11, 13])
def test_labels_of_another_length_are_a_clear_error(length):
    model = tiny_model("llama").train()
    sloth.patch(model)
    ids, _ = _batch()
    labels = torch.randint(3, VOCAB, (2, length))
    with pytest.raises(ValueError, match=rf"labels.*\(2, {length}\).*\(2, 12\)|\(2, 12\).*labels.*\(2, {length}\)"):
        model(input_ids=ids, labels=labels)
