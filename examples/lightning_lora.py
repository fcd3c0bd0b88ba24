"""LoRA fine-tuning with Lightning and ``SlothStrategy``: one argument to the Trainer.

    python examples/lightning_lora.py                     # tiny Llama, CPU, ~30 steps, seconds
    python examples/lightning_lora.py --model DIR         # a local causal LM (save_pretrained folder)
    python examples/lightning_lora.py --strategy ddp --devices 2
    python examples/lightning_lora.py --strategy fsdp2 --devices 2   # FSDP2 (fully_shard): LoRA's frozen base
                                                                     # weights sharded, 1/devices per GPU

Everything is local: the tiny model is built from a config, its tokenizer is trained on the
instruction set shipped with the package (sloth_plugins/data/), and --model only reads a folder on disk.
"""
import argparse
import time

import lightning as L
import torch
from peft import LoraConfig, get_peft_model

import sloth_plugins as sloth
from sloth_plugins.testing import format_example, load_instructions, tiny_model, train_tokenizer


class LoRAFineTune(L.LightningModule):
    def __init__(self, model, lr=2e-3):
        super().__init__()
        self.model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def load(model_dir):
    if model_dir is None:
        tokenizer = train_tokenizer(format_example(r) for r in load_instructions())
        model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=128, layers=4)
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), tokenizer


def dataloader(tokenizer, batch_size, seq_len):
    texts = [format_example(r) + (tokenizer.eos_token or "") for r in load_instructions()]

    def collate(batch):
        enc = tokenizer(batch, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return dict(enc)

    return torch.utils.data.DataLoader(texts, batch_size=batch_size, shuffle=True, collate_fn=collate)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model folder (default: a tiny random Llama)")
    parser.add_argument("--strategy", default="single", choices=["single", "ddp", "fsdp2", "fsdp"],
                        help="fsdp2 (Lightning's ModelParallelStrategy + fully_shard) is the sharded one to pick with "
                             "LoRA; fsdp is FSDP1")
    parser.add_argument("--devices", default=1, type=int)
    parser.add_argument("--steps", default=30, type=int)
    parser.add_argument("--batch-size", default=8, type=int)
    parser.add_argument("--seq-len", default=64, type=int)
    parser.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "offload", "recompute", "off"])
    args = parser.parse_args()

    L.seed_everything(0)
    model, tokenizer = load(args.model)
    module = LoRAFineTune(model)
    strategy = sloth.SlothStrategy(args.strategy, gradient_checkpointing=args.gradient_checkpointing)
    trainer = L.Trainer(strategy=strategy, devices=args.devices, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, log_every_n_steps=5)
    start = time.perf_counter()
    trainer.fit(module, dataloader(tokenizer, args.batch_size, args.seq_len))
    if trainer.is_global_zero:
        print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s, "
              f"final loss {trainer.callback_metrics['loss'].item():.3f}")


if __name__ == "__main__":
    main()
