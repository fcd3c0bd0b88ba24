"""Quickstart: LoRA fine-tuning of a small Llama-shaped model with HF Trainer + SlothCallback.

Everything is local: the instruction data ships with the package (sloth_plugins/data/), the
tokenizer is trained here, the model is randomly initialised from a config. Runs on a 2-core CPU
in about a minute; on a GPU the same script uses the Triton kernels. Needs the [hf] extra.

    python -m sloth_plugins.quickstart              # sloth-patched run (installed package or checkout)
    python -m sloth_plugins.quickstart --baseline   # also the same run without sloth, side by side
    python examples/quickstart.py                   # the same, from a checkout (output in examples/output)
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments  # noqa: E402

import sloth_plugins as sloth  # noqa: E402
from sloth_plugins.kernels import triton_status  # noqa: E402
from sloth_plugins.testing import DATA_FILE, format_example, load_instructions, tiny_model, train_tokenizer  # noqa: E402


class TokenCounter:
    """Collator wrapper that counts the real (non-pad) tokens the Trainer consumes."""

    def __init__(self, collator):
        self.collator, self.tokens = collator, 0

    def __call__(self, features):
        batch = self.collator(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def build_data(tokenizer, max_length):
    rows = load_instructions()
    ds = Dataset.from_dict({"text": [format_example(r) + tokenizer.eos_token for r in rows]})
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True,
                  remove_columns=["text"])


def run(args, tokenizer, data, use_sloth: bool) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model("llama", seed=0, dtype=dtype, vocab_size=len(tokenizer), hidden_size=args.hidden,
                       layers=args.layers, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    collator = TokenCounter(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    targs = TrainingArguments(output_dir=os.path.join(args.output_dir, "sloth" if use_sloth else "baseline"),
                              max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                              learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=5,
                              logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[],
                              use_cpu=device == "cpu", seed=0, dataloader_num_workers=0, bf16=dtype == torch.bfloat16)
    callbacks = [sloth.SlothCallback()] if use_sloth else []
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collator, callbacks=callbacks)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU, max allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if use_sloth:
        model.save_pretrained(os.path.join(args.output_dir, "adapter"))
    return {"name": "sloth_plugins" if use_sloth else "HF + PEFT", "first_loss": float(losses[0]),
            "final_loss": float(losses[-1]), "train_loss": result.training_loss,
            "tokens_per_s": collator.tokens / elapsed, "peak": peak, "seconds": elapsed}


def main(argv=None, output_dir: str = "sloth-quickstart") -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--output-dir", default=output_dir)
    p.add_argument("--baseline", action="store_true", help="also train without sloth and compare")
    args = p.parse_args(argv)

    print(triton_status())
    tokenizer = train_tokenizer(format_example(r) for r in load_instructions())
    data = build_data(tokenizer, args.max_length)
    print(f"data: {len(data)} instruction examples from {DATA_FILE}, "
          f"tokenizer: {len(tokenizer)} tokens (trained locally)")
    rows = [run(args, tokenizer, data, use_sloth=True)]
    if args.baseline:
        rows.append(run(args, tokenizer, data, use_sloth=False))

    print("\n" + f"{'run':<16}{'loss: first':>12}{'final':>9}{'tokens/s':>11}{'time s':>9}   peak memory")
    for r in rows:
        print(f"{r['name']:<16}{r['first_loss']:>12.4f}{r['final_loss']:>9.4f}{r['tokens_per_s']:>11.0f}"
              f"{r['seconds']:>9.1f}   {r['peak']}")
    if not torch.cuda.is_available():
        print("\nCPU run: the Triton kernels are GPU-only, so the torch reference paths ran here; "
              "speed-ups show on a CUDA GPU (see benchmarks/RESULTS.md).")
    print(f"adapter saved to {os.path.join(args.output_dir, 'adapter')}")
    ok = rows[0]["final_loss"] < rows[0]["first_loss"]
    print("loss went down: yes" if ok else "loss went down: NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
