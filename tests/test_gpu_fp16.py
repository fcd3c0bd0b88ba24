"""fp16 training on a GPU (issue 17): ``TrainingArguments(fp16=True)`` is fp16 autocast with a GradScaler,
what people run on GPUs without bf16 (T4, V100). For every family of the table, 50 LoRA steps of the HF
Trainer with and without SlothCallback on the same tiny model and batches: per-step losses within the
fp16 band, nothing non-finite, and the scaler skips the same steps (its scale after every step is the
same). The kernels' own fp16 checks are the ``float16`` cases of tests/kernels (``-m gpu``).
"""
import pytest
import torch

from sloth_plugins.testing import FAMILIES, MicroLossRecorder, right_pad_collate, tiny_model, with_lora

STEPS = 50


def _rows(n, vocab, seed=0, distinct=8):
    """``distinct`` random rows, repeated: random tokens have nothing to learn, repeated ones are fitted."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(48, 129, (distinct,), generator=g)
    rows = [dict(input_ids=torch.randint(3, vocab, (int(k),), generator=g)) for k in lengths]
    return [rows[i % distinct] for i in range(n)]


def _train(family, use_sloth, out):
    from transformers import Trainer, TrainingArguments

    import sloth_plugins as sloth
    model = with_lora(tiny_model(family, seed=0))
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3, fp16=True,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0, dataloader_num_workers=0,
        train_sampling_strategy="sequential", gradient_checkpointing=True, remove_unused_columns=False,
        disable_tqdm=True)
    callbacks = [sloth.SlothCallback(verbose=False)] if use_sloth else []

    class T(MicroLossRecorder, Trainer):
        pass

    trainer = T(model=model, args=args, train_dataset=_rows(STEPS * 4, model.config.vocab_size),
                data_collator=right_pad_collate, callbacks=callbacks)
    scaler = trainer.accelerator.scaler
    assert scaler is not None, "fp16=True without a GradScaler"
    scales, update = [], scaler.update

    def record(new_scale=None):
        update(new_scale)
        scales.append(scaler.get_scale())

    scaler.update = record
    trainer.train()
    return trainer.micro_losses, scales, (callbacks[0].report if use_sloth else None)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_fp16_trainer_matches_the_run_without_sloth(family, tmp_path):
    plain, plain_scales, _ = _train(family, False, tmp_path / "plain")
    fast, fast_scales, report = _train(family, True, tmp_path / "sloth")
    assert "Triton paths active" in report.triton and not report.fallbacks(), str(report)
    assert report.count("loss") == 1 and report.count("rms_norm") >= 1, str(report)
    assert len(plain) == len(fast) == STEPS
    assert all(torch.isfinite(torch.tensor(fast))), fast
    for step, (a, b) in enumerate(zip(fast, plain)):
        assert abs(a - b) <= 1e-2 * abs(b), f"step {step}: sloth {a} vs unpatched {b}"
    assert fast_scales == plain_scales, (fast_scales, plain_scales)     # the same steps skipped
    assert sum(fast[-5:]) < sum(fast[:5])
