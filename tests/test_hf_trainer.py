"""HF Trainer + SlothCallback: parity with the unpatched run, adapters portable to plain PEFT."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import sloth_plugins as sloth
from sloth_plugins.testing import MicroLossRecorder, format_example, load_instructions, tiny_model, train_tokenizer

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(format_example(r) for r in load_instructions())


@pytest.fixture(scope="module")
def dataset(tokenizer):
    from datasets import Dataset
    rows = load_instructions(limit=64)
    texts = [format_example(r) for r in rows]
    ds = Dataset.from_dict({"text": texts})
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=48), batched=True,
                  remove_columns=["text"])


class RecordingTrainer(MicroLossRecorder, Trainer):
    pass


def _train(family, tokenizer, dataset, tmp_path, *, patched, peft=True, steps=4, grad_ckpt=False, seed=0):
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if peft:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path / f"out-{patched}"), max_steps=steps,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-3,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=seed,
                             data_seed=seed, dataloader_num_workers=0, gradient_checkpointing=grad_ckpt,
                             disable_tqdm=True)
    callbacks = [sloth.SlothCallback(verbose=False)] if patched else []
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks,
                               data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    return model, trainer.micro_losses, callbacks


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_lora_parity_with_grad_accumulation_and_padding(family, tokenizer, dataset, tmp_path):
    ref_model, ref_losses, _ = _train(family, tokenizer, dataset, tmp_path, patched=False)
    model, losses, callbacks = _train(family, tokenizer, dataset, tmp_path, patched=True)
    report = callbacks[0].report
    assert report.count("loss") == 1 and report.count("rms_norm") > 0 and report.count("rope") == 2
    assert len(losses) == len(ref_losses) == 8      # 4 steps x 2 accumulated micro-batches
    assert losses == pytest.approx(ref_losses, rel=2e-5)
    ref, got = _trainable(ref_model), _trainable(model)
    assert ref.keys() == got.keys() and len(ref) == 2 * len(LORA_TARGETS) * 2
    # Adam divides by sqrt(v): elements whose gradients are ~0 amplify 1e-9 rounding to ~1e-6
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_full_finetune_parity_with_gradient_checkpointing(tokenizer, dataset, tmp_path):
    ref_model, ref_losses, _ = _train("llama", tokenizer, dataset, tmp_path, patched=False, peft=False, grad_ckpt=True)
    model, losses, callbacks = _train("llama", tokenizer, dataset, tmp_path, patched=True, peft=False, grad_ckpt=True)
    assert losses == pytest.approx(ref_losses, rel=2e-5)
    layers = model.model.layers
    # the Trainer enabled checkpointing after our patch: the plan was re-asserted, not replaced
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(type(layer._gradient_checkpointing_func).__name__ == "LayerCheckpointer" for layer in layers)
    sloth.unpatch(model)
    assert all(layer.gradient_checkpointing for layer in layers), "unpatch keeps the Trainer's choice"
    assert all(type(layer._gradient_checkpointing_func).__name__ != "LayerCheckpointer" for layer in layers)
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name], p, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_saved_adapter_loads_in_plain_peft_with_identical_logits(tokenizer, dataset, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("llama", seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(base_dir)
    model, _, _ = _train("llama", tokenizer, dataset, tmp_path, patched=True)
    model.save_pretrained(adapter_dir)
    ids = torch.tensor([tokenizer("### Instruction:\nAdd 2 and 3.\n### Response:\n")["input_ids"]])
    sloth.unpatch(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({ids.tolist()})).logits
        assert not any(m.startswith("sloth_plugins") for m in sys.modules)
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    got = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_callback_rejects_bad_options():
    with pytest.raises(sloth.SlothConfigError, match="valid keys"):
        sloth.SlothCallback(loss_mode="chunked")
