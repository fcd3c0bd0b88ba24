"""Padding-free training of ordinary padded batches (``SlothConfig(padding_free=True)``), and the
three adapters that switch it on: the HF / TRL callback, the Lightning strategy, the Axolotl plugin.

The central check: a right-padded batch (prompt labels -100) trained through the patched model
gives the unpatched model's loss and gradients, while the decoder only ever sees one packed row
[1, real tokens]. A left-padded batch reaches the decoder unpacked (the padded model predicts each
row's first real token from a pad position, which a packed row lacks), with the same loss.

Axolotl tests need the axolotl venv: /work/venvs/axo/bin/pytest tests/test_padding_free_adapters.py
"""
import copy
import os
import re
import types
from pathlib import Path

import pytest
import torch

import sloth_plugins as sloth
from sloth_plugins.integrations.collators import PaddingFreeCollator
from sloth_plugins.models import resolve_causal_lm
from sloth_plugins.testing import MicroLossRecorder, right_pad_collate, tiny_model

VOCAB = 384
LENGTHS = [7, 12, 3, 9]
FAST = dict(kernels=False, gradient_checkpointing="off")     # the padding-free path alone


def _samples(seed=0, lengths=LENGTHS, prompt=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100                              # a prompt that is not trained on
        out.append(dict(input_ids=ids, labels=labels))
    return out


def _padded(samples, side="right", pad_label=-100):
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, pad_label)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols], mask[i, cols], labels[i, cols] = s["input_ids"], 1, s["labels"]
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


class DecoderInputs:
    """Records what the first decoder layer is called with: the shapes the packing produced."""

    def __init__(self, model):
        self.calls = []
        layer = resolve_causal_lm(model).model.layers[0]
        self.handle = layer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.calls.append(dict(shape=tuple(hidden.shape[:2]), position_ids=kwargs.get("position_ids"),
                               cu=kwargs.get("cu_seq_lens_q"), use_cache=kwargs.get("use_cache")))


def _loss_and_grads(model, batch, **extra):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(ref, got, tol=1e-5):
    (out_a, grads_a), (out_b, grads_b) = ref, got
    assert torch.isfinite(out_b.loss)
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------- (a) the plugin

@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("loss", ["chunked", "off"])
def test_padded_batches_train_packed_with_the_padded_loss_and_gradients(side, loss):
    batch = _padded(_samples(), side)
    model = tiny_model("llama").train()
    for extra in ({"num_items_in_batch": torch.tensor(17)}, {}):   # sum / items, and the mean
        ref = _loss_and_grads(model, batch, **extra)
        report = sloth.patch(model, padding_free=True, loss=loss, **FAST)
        assert report.count("padding_free") == 1 and "padding_free" not in report.fallbacks()
        seen = DecoderInputs(model)
        got = _loss_and_grads(model, batch, **extra)
        seen.handle.remove()
        (call,) = seen.calls
        if side == "left":
            _assert_same(ref, got, tol=0 if loss == "off" else 1e-5)          # the model's own decoder run
            assert call["shape"] == (4, 12) and call["cu"] is None
            assert any("padding_free: a padded training batch was passed through unpacked: left padding" in n
                       for n in report.notes)
            sloth.unpatch(model)
            continue
        _assert_same(ref, got)
        total = sum(LENGTHS)
        assert call["shape"] == (1, total) and call["use_cache"] is False
        assert call["cu"].tolist() == [0, 7, 19, 22, 31]
        assert call["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]
        sloth.unpatch(model)


@pytest.mark.parametrize("family", ["gemma2", "qwen3", "phi3"])
def test_other_families_train_padded_batches_packed(family):
    batch = _padded(_samples(9), "right")
    model = tiny_model(family).train()
    ref = _loss_and_grads(model, batch, num_items_in_batch=torch.tensor(1))
    sloth.patch(model, padding_free=True, **FAST)
    seen = DecoderInputs(model)
    _assert_same(ref, _loss_and_grads(model, batch, num_items_in_batch=torch.tensor(1)))
    assert seen.calls[0]["shape"] == (1, sum(LENGTHS))


def test_the_sloth_loss_and_the_rope_kernel_see_the_packed_row():
    batch = _padded(_samples(1), "right")
    model = tiny_model("llama").train()
    ref = _loss_and_grads(model, batch, num_items_in_batch=torch.tensor(20))
    report = sloth.patch(model, padding_free=True)                 # every lever on (torch references on CPU)
    assert report.count("loss") == 1 and report.count("rope") == 2 and report.count("padding_free") == 1
    seen = DecoderInputs(model)
    _assert_same(ref, _loss_and_grads(model, batch, num_items_in_batch=torch.tensor(20)))
    assert seen.calls[0]["shape"] == (1, sum(LENGTHS))


def test_logits_come_back_in_the_padded_shape_with_zeros_at_padding():
    batch = _padded(_samples(2), "right")
    real = batch["attention_mask"].bool()
    model = tiny_model("llama").train()
    ref, _ = _loss_and_grads(model, batch)
    for options in (dict(loss="off"), dict(return_logits=True)):
        sloth.patch(model, padding_free=True, **options, **FAST)
        seen = DecoderInputs(model)
        got, _ = _loss_and_grads(model, batch)
        seen.handle.remove()
        assert seen.calls[0]["shape"] == (1, sum(LENGTHS))
        assert got.logits.shape == ref.logits.shape
        torch.testing.assert_close(got.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(got.logits[~real]) == 0
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-5)
        sloth.unpatch(model)


def test_shift_labels_keep_the_padded_layout():
    batch = _padded(_samples(4), "right")
    shift = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    model = tiny_model("llama").train()
    ref = _loss_and_grads(model, batch, shift_labels=shift)
    sloth.patch(model, padding_free=True, **FAST)
    _assert_same(ref, _loss_and_grads(model, batch, shift_labels=shift))


def test_axolotl_multipack_mask_is_split_into_its_samples():
    """Axolotl's multipack rows: several samples per row, mask = sample index (0 on padding),
    position ids restarting per sample. Transformers reads that mask as one sample per row."""
    samples = _samples(5, lengths=[4, 6, 5, 3, 7])
    rows = [[0, 1], [2, 3, 4]]
    width = 20
    ids = torch.zeros(2, width, dtype=torch.long)
    mask, positions = torch.zeros_like(ids), torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, members in enumerate(rows):
        at = 0
        for k, i in enumerate(members):
            n = len(samples[i]["input_ids"])
            ids[r, at:at + n], labels[r, at:at + n] = samples[i]["input_ids"], samples[i]["labels"]
            mask[r, at:at + n], positions[r, at:at + n] = k + 1, torch.arange(n)
            at += n
    model = tiny_model("llama").train()
    ref = _loss_and_grads(model, _padded(samples), num_items_in_batch=torch.tensor(1))
    sloth.patch(model, padding_free=True, **FAST)
    seen = DecoderInputs(model)
    got = _loss_and_grads(model, dict(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions),
                          num_items_in_batch=torch.tensor(1))
    _assert_same(ref, got)
    assert seen.calls[0]["cu"].tolist() == [0, 4, 10, 15, 18, 25]


def test_batches_that_are_not_padded_or_already_packed_pass_through():
    samples = _samples(6)
    model = tiny_model("llama").train()
    report = sloth.patch(model, padding_free=True, **FAST)
    seen = DecoderInputs(model)
    packed = PaddingFreeCollator()([{k: v.tolist() for k, v in s.items()} for s in samples])
    model(**packed)
    full = dict(input_ids=torch.randint(3, VOCAB, (2, 6)), attention_mask=torch.ones(2, 6, dtype=torch.long))
    model(**full)
    padded = _padded(samples)
    model(**padded, output_hidden_states=True)
    model(**padded, use_cache=True)
    restarting = dict(padded, position_ids=torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]).expand(4, -1))
    model(**restarting)
    holed = dict(padded, attention_mask=padded["attention_mask"].clone())
    holed["attention_mask"][1, 3] = 0
    model(**holed)
    model.eval()
    with torch.no_grad():
        model(**padded)
    model.train()
    shapes = [c["shape"] for c in seen.calls]
    assert shapes == [(1, sum(LENGTHS)), (2, 6)] + [(4, 12)] * 5
    assert seen.calls[0]["cu"] is packed["cu_seq_lens_q"]                      # untouched
    assert all(c["cu"] is None for c in seen.calls[1:])
    notes = [n for n in report.notes if n.startswith("padding_free:")]
    assert len(notes) == 4 and "output_hidden_states" in notes[0] and "use_cache=True" in notes[1]
    assert "restart inside a sample" in notes[2] and "holes" in notes[3]
    model(**padded, output_hidden_states=True)
    assert len([n for n in report.notes if n.startswith("padding_free:")]) == 4     # once each


def test_peft_lora_parity_and_unpatch_restores_the_forward():
    from peft import LoraConfig, get_peft_model

    batch = _padded(_samples(7), "right")
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                           target_modules=["q_proj", "v_proj", "down_proj"])).train()
    lm = model.get_base_model()
    ref = _loss_and_grads(model, batch, num_items_in_batch=torch.tensor(9))
    report = sloth.patch(model, padding_free=True)
    assert report.count("padding_free") == 1 and report.count("loss") == 1
    seen = DecoderInputs(model)
    got = _loss_and_grads(model, batch, num_items_in_batch=torch.tensor(9))
    assert seen.calls[-1]["shape"] == (1, sum(LENGTHS))
    _assert_same(ref, got)
    assert "forward" in lm.model.__dict__
    assert sloth.unpatch(model) and "forward" not in lm.model.__dict__ and "forward" not in lm.__dict__
    model(**batch)
    assert seen.calls[-1]["shape"] == (4, 12) and seen.calls[-1]["cu"] is None


def test_a_model_without_the_padding_free_contract_falls_back_and_strict_raises():
    model = tiny_model("llama").train()
    model._supports_flash_attn = False       # what a family without FlashAttention support declares
    report = sloth.patch(model, padding_free=True, **FAST)
    assert report.count("padding_free") == 0 and "FlashAttention" in report.fallbacks()["padding_free"][0]
    assert "forward" not in model.model.__dict__ and report.count("loss") == 1    # the loss is still patched
    sloth.unpatch(model)
    with pytest.raises(sloth.SlothUnsupported, match="padding_free"):
        sloth.patch(model, padding_free=True, strict=True, **FAST)


def test_gradient_checkpointing_with_packed_rows():
    batch = _padded(_samples(8), "right")
    model = tiny_model("llama").train()
    ref = _loss_and_grads(model, batch, num_items_in_batch=torch.tensor(1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sloth.patch(model, padding_free=True, gradient_checkpointing="recompute")
    _assert_same(ref, _loss_and_grads(model, batch, num_items_in_batch=torch.tensor(1)))


@pytest.mark.gpu
def test_gpu_padded_batches_train_packed_through_the_triton_kernel():
    vocab, lengths = 1024, [700, 33, 1500, 260]
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g)
        samples.append(dict(input_ids=ids, labels=ids.masked_fill(torch.arange(n) < 5, -100)))
    model = tiny_model("llama", dtype=torch.bfloat16, vocab_size=vocab, hidden_size=1024, intermediate_size=2048,
                       num_attention_heads=8, num_key_value_heads=2, layers=2).cuda().train()
    for side in ("right", "left"):
        batch = {k: v.cuda() for k, v in _padded(samples, side).items()}
        items = torch.tensor(sum(lengths) - 5 * len(lengths), device="cuda")
        (ref_out, ref_grads) = _loss_and_grads(model, batch, num_items_in_batch=items)
        report = sloth.patch(model, padding_free=True, attention="sloth")
        assert "Triton varlen kernel" in str(report) and report.count("padding_free") == 1
        seen = DecoderInputs(model)
        out, grads = _loss_and_grads(model, batch, num_items_in_batch=items)
        seen.handle.remove()
        sloth.unpatch(model)
        assert seen.calls[0]["shape"] == ((1, sum(lengths)) if side == "right" else (4, max(lengths)))
        assert torch.isfinite(out.loss) and abs(out.loss.item() - ref_out.loss.item()) <= 1e-2 * abs(ref_out.loss.item())
        for name, ref in ref_grads.items():
            rel = ((grads[name].double() - ref.double()).norm() / ref.double().norm()).item()
            assert rel <= 3e-2, (side, name, rel)


# ---------------------------------------------------------------------------- (b) HF Trainer

def _rows(seed, count=24, low=4, high=20):
    g = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(3, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),),
                                         generator=g)) for _ in range(count)]


def _hf_run(tmp_path, callbacks, steps=4):
    from transformers import Trainer, TrainingArguments

    class RecordingTrainer(MicroLossRecorder, Trainer):
        pass

    model = tiny_model("llama", seed=1)
    args = TrainingArguments(output_dir=str(tmp_path / f"hf-{len(callbacks)}"), max_steps=steps,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-3,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=_rows(0), data_collator=right_pad_collate,
                               callbacks=callbacks)
    seen = DecoderInputs(model)
    trainer.train()
    return trainer, seen


def test_hf_trainer_with_the_default_padded_collator_matches_the_unpatched_run(tmp_path):
    ref, ref_seen = _hf_run(tmp_path, [])
    callback = sloth.SlothCallback(padding_free=True, verbose=False)
    got, seen = _hf_run(tmp_path, [callback])
    assert callback.report.count("padding_free") == 1 and callback.report.count("loss") == 1
    assert all(c["shape"][0] == 1 and c["cu"] is not None for c in seen.calls)
    assert all(c["shape"][0] == 4 for c in ref_seen.calls)
    assert len(got.micro_losses) == len(ref.micro_losses) == 8      # 4 steps x 2 accumulated micro-batches
    assert got.micro_losses == pytest.approx(ref.micro_losses, rel=2e-5)


# ---------------------------------------------------------------------------- (c) TRL SFTTrainer

def _sft_run(tmp_path, name, callbacks, **sft_options):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    class RecordingSFTTrainer(MicroLossRecorder, SFTTrainer):
        pass

    rows = _rows(1, count=16)
    ds = Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in rows]})
    model = tiny_model("llama", seed=2)
    args = SFTConfig(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, learning_rate=2e-3, logging_steps=1, save_strategy="no",
                     report_to=[], use_cpu=True, seed=0, disable_tqdm=True, pad_token="<pad>", **sft_options)
    trainer = RecordingSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=_tokenizer(),
                                  callbacks=callbacks)
    seen = DecoderInputs(model)
    trainer.train()
    return trainer, seen


def _tokenizer():
    from sloth_plugins.testing import format_example, load_instructions, train_tokenizer
    return train_tokenizer(format_example(r) for r in load_instructions(limit=32))


def test_trl_padding_free_turns_the_switch_on_and_matches_the_padded_run(tmp_path):
    pytest.importorskip("trl")
    ref, ref_seen = _sft_run(tmp_path, "ref", [], max_length=None)
    assert all(c["shape"][0] == 4 for c in ref_seen.calls)
    callback = sloth.SlothCallback(verbose=False, **FAST)
    got, seen = _sft_run(tmp_path, "trl-flat", [callback], padding_free=True, max_length=None)
    report = callback.report
    assert report.count("padding_free") == 1 and callback.config.padding_free is False
    assert sum("TRL SFTTrainer flattens each batch" in n for n in report.notes) == 1
    # TRL's own flattened rows reach the model as they are (cu_seq_lens only from TRL 1.16)
    assert all(c["shape"][0] == 1 and c["position_ids"][0, 0] == 0 for c in seen.calls)
    _assert_sft_parity(got.micro_losses, ref.micro_losses)


def _assert_sft_parity(got, ref):
    # Before the first optimizer step the losses agree to fp32 rounding. After it, packed and padded
    # matmuls round differently and Adam (lr 2e-3) turns 1e-7 gradient noise on near-zero elements
    # into lr-sized steps (as in test_trl.py), so later steps are held to 5e-4.
    assert len(got) == len(ref) == 6
    assert got[:2] == pytest.approx(ref[:2], rel=2e-5)
    assert got == pytest.approx(ref, rel=5e-4)


def test_sloth_packs_the_padded_batches_of_a_plain_sft_trainer(tmp_path):
    pytest.importorskip("trl")
    ref, _ = _sft_run(tmp_path, "ref", [], max_length=None)
    callback = sloth.SlothCallback(padding_free=True, verbose=False, **FAST)
    got, seen = _sft_run(tmp_path, "sloth-flat", [callback], max_length=None)
    assert callback.report.count("padding_free") == 1
    assert not any("TRL SFTTrainer flattens" in n for n in callback.report.notes)
    assert all(c["shape"][0] == 1 and c["cu"] is not None for c in seen.calls)
    _assert_sft_parity(got.micro_losses, ref.micro_losses)


# ---------------------------------------------------------------------------- (d) Lightning

def test_lightning_fit_with_padding_free_matches_the_default_strategy():
    L = pytest.importorskip("lightning")
    from sloth_plugins.integrations.lightning import SlothStrategy

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.losses = tiny_model("llama", seed=3), []

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=2e-3)

    def fit(strategy):
        module = Tiny()
        seen = DecoderInputs(module.model)
        loader = torch.utils.data.DataLoader(_rows(2, count=16), batch_size=4, collate_fn=right_pad_collate)
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=4, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, loader)
        return module, trainer, seen

    ref, _, ref_seen = fit("auto")
    strategy = SlothStrategy(padding_free=True, verbose=False)
    assert strategy.sloth_config.padding_free is True
    got, trainer, seen = fit(strategy)
    assert trainer.strategy.sloth_report.count("padding_free") == 1
    assert all(c["shape"][0] == 1 for c in seen.calls) and all(c["shape"][0] == 4 for c in ref_seen.calls)
    assert len(got.losses) == len(ref.losses) == 4
    assert got.losses == pytest.approx(ref.losses, rel=2e-5)


# ---------------------------------------------------------------------------- (e) Axolotl

REPO = Path(__file__).resolve().parents[1]
AXOLOTL_PLUGIN = "sloth_plugins.integrations.axolotl.SlothPlugin"


@pytest.fixture
def axolotl():
    pytest.importorskip("axolotl")
    from axolotl.integrations.base import PluginManager

    def reset():
        manager = PluginManager.get_instance()
        manager.plugins.clear()
        manager.cfg = None

    reset()
    yield types.SimpleNamespace(reset=reset)
    reset()


@pytest.fixture(scope="module")
def axolotl_model_dir(tmp_path_factory):
    pytest.importorskip("axolotl")
    import importlib.util
    spec = importlib.util.spec_from_file_location("sloth_example_make_model", REPO / "examples/axolotl/make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(str(tmp_path_factory.mktemp("tiny-llama")))


def _axolotl_config(model_dir, out, plugin=True, **extra):
    cfg = dict(base_model=model_dir, datasets=[dict(path=str(REPO / "tests/data/tiny_sft.jsonl"), ds_type="json",
                                                    type="input_output")],
               dataset_prepared_path=os.path.join(out, "prepared"), dataset_num_proc=1, val_set_size=0,
               output_dir=os.path.join(out, "out"), sequence_len=96, sample_packing=False, adapter="lora",
               lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True, micro_batch_size=2,
               gradient_accumulation_steps=1, max_steps=3, num_epochs=1, optimizer="adamw_torch",
               learning_rate=1e-3, bf16=False, fp16=False, tf32=False, logging_steps=1, save_strategy="no",
               seed=42, lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,
               lora_embedding_kernel=False)
    if plugin:
        cfg.update(plugins=[AXOLOTL_PLUGIN], sloth_kernels=False, sloth_gradient_checkpointing="off")
    cfg.update(extra)
    return cfg


def _validated(axolotl, raw):
    from axolotl.cli.config import gpu_capabilities
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    axolotl.reset()
    cfg = DictDefault(copy.deepcopy(raw))
    prepare_plugins(cfg)
    capabilities, env_capabilities = gpu_capabilities()
    return validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)


@pytest.mark.axolotl
def test_axolotl_padding_free_follows_sample_packing_unless_set(axolotl, axolotl_model_dir, tmp_path):
    from sloth_plugins.integrations.axolotl_args import sloth_config_from

    def config(**extra):
        return sloth_config_from(_validated(axolotl, _axolotl_config(axolotl_model_dir, str(tmp_path), **extra)))

    assert config().padding_free is False
    assert config(sample_packing=True, attn_implementation="sdpa").padding_free is True
    assert config(sample_packing=True, sloth_padding_free=False).padding_free is False
    assert config(sloth_padding_free=True).padding_free is True
    # keys Axolotl would drop silently if the plugin's schema did not declare them
    assert config(sloth_attention="sloth").attention == "sloth"
    with pytest.raises(ValueError, match=re.escape("sloth_attention\n  Input should be 'auto', 'sloth' or 'sdpa'")):
        config(sloth_attention="flash")
    with pytest.raises(ValueError, match="sloth_padding_free\n  Input should be a valid boolean"):
        config(sloth_padding_free="sometimes")


def test_context_parallel_splits_padded_rows_so_padding_free_is_refused():
    pytest.importorskip("pydantic")
    from sloth_plugins.integrations.axolotl_args import conflicts

    on = sloth.SlothConfig(padding_free=True)
    problems = conflicts({"context_parallel_size": 2}.get, on)
    assert len(problems) == 1 and "set sloth_padding_free: false, or sample_packing: true" in problems[0]
    assert conflicts({"context_parallel_size": 2, "sample_packing": True}.get, on) == []
    assert conflicts({"context_parallel_size": 2}.get, sloth.SlothConfig()) == []
    assert conflicts({"context_parallel_size": 1}.get, on) == []


def _axolotl_train(axolotl, raw):
    from axolotl.common.datasets import load_datasets
    from axolotl.integrations.base import PluginManager
    from axolotl.train import train
    from axolotl.utils.config import normalize_config

    cfg = _validated(axolotl, raw)
    normalize_config(cfg)
    PluginManager.get_instance().cfg = cfg
    meta = load_datasets(cfg=cfg)
    torch.manual_seed(0)
    model, _, trainer = train(cfg=cfg, dataset_meta=meta)
    return cfg, model, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.axolotl
def test_axolotl_sample_packing_runs_with_the_plugin(axolotl, axolotl_model_dir, tmp_path, monkeypatch):
    """sample_packing with sdpa (Axolotl drops the mask) matches the run without the plugin; with
    no attn_implementation Axolotl keeps its mask of sample indices, which transformers reads as
    one sample per row, and the plugin splits it: the same losses as the sdpa run."""
    import logging
    packing = dict(sample_packing=True, pad_to_sequence_len=True)
    _, _, ref = _axolotl_train(axolotl, _axolotl_config(axolotl_model_dir, str(tmp_path / "ref"), plugin=False,
                                                        attn_implementation="sdpa", **packing))
    seen = []

    class Seen(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
    plugin_logger = logging.getLogger("axolotl.integrations.sloth")   # the plugin's logger (Axolotl's handlers)
    monkeypatch.setattr(plugin_logger, "handlers", [*plugin_logger.handlers, Seen(level=logging.INFO)])

    def curve_lines():
        lines = [m for m in seen if "loss curve differs" in m]
        seen.clear()
        return lines
    cfg, model, got = _axolotl_train(axolotl, _axolotl_config(axolotl_model_dir, str(tmp_path / "sdpa"),
                                                              attn_implementation="sdpa", **packing))
    assert curve_lines() == []        # sdpa keeps the samples apart in plain Axolotl too: same curve
    report = sloth.get_state(model).report
    assert report.count("padding_free") == 1
    assert any("padding_free follows sample_packing" in n and "drops the attention mask" in n for n in report.notes)
    assert len(got) == len(ref) == 3 and got == pytest.approx(ref, rel=1e-4)
    from sloth_plugins.plugins import padding_free
    builds, real_build = [], padding_free._Packing.build.__func__

    def build(cls, mask, position_ids):
        packing = real_build(cls, mask, position_ids)
        assert isinstance(packing, padding_free._Packing), packing
        builds.append((mask.shape[0], int(mask.max()), packing.cu_seq_lens.numel() - 1))
        return packing

    monkeypatch.setattr(padding_free._Packing, "build", classmethod(build))
    cfg, model, split = _axolotl_train(axolotl, _axolotl_config(axolotl_model_dir, str(tmp_path / "unset"), **packing))
    # each step's rows held several samples (Axolotl's mask values 1, 2, ...), each now a sample of its own
    assert len(builds) == 3 and all(highest > 1 and samples > rows for rows, highest, samples in builds), builds
    report = sloth.get_state(model).report
    assert any("mask of sample indices" in n for n in report.notes), report.notes
    assert split == pytest.approx(ref, rel=1e-4)
    # said once at start, where users compare curves with plain Axolotl's
    lines = curve_lines()
    assert len(lines) == 1 and "sample_packing with no attn_implementation" in lines[0], lines
    assert "keeps the packed samples apart" in lines[0] and "attn_implementation: sdpa" in lines[0]
