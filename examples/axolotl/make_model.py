"""Build a random-init Llama model folder locally (nothing is downloaded), ready for Axolotl.

    python examples/axolotl/make_model.py --out examples/outputs/tiny-llama             # seconds, CPU
    python examples/axolotl/make_model.py --shape llama-3.2-1b --out /tmp/llama-1b      # GPU benchmark
    python examples/axolotl/make_model.py --shape llama-3-8b --out /tmp/llama-8b

The folder gets the model (safetensors), a byte-level BPE tokenizer trained on the
instruction set shipped with the package (sloth_plugins/data/), and ``sft.jsonl``: that instruction set in
Axolotl's ``input_output`` format (prompt segment masked, response trained on).
The larger shapes keep Llama's real vocabulary size (128256) for a realistic lm_head; the
tokenizer is smaller, which is fine for throughput runs on token ids (``type: _synthetic``).
"""
import argparse
import json
import os

import torch

from sloth_plugins.testing import PROMPT, load_instructions, tiny_config, train_tokenizer

SHAPES = {
    "tiny": None,
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def write_sft_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            segments = [{"label": False, "text": PROMPT.format(instruction=row["instruction"])},
                        {"label": True, "text": row["response"] + "</s>"}]
            f.write(json.dumps({"segments": segments}) + "\n")


def build(out: str, shape: str = "tiny", seed: int = 0, device: str = "cpu", dtype=None) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    rows = load_instructions()
    tokenizer = train_tokenizer(PROMPT.format(instruction=r["instruction"]) + r["response"] for r in rows)
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if SHAPES[shape] is None:
        config = tiny_config("llama", vocab_size=len(tokenizer), **special)
        dtype = dtype or torch.float32
    else:
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rms_norm_eps=1e-5,
                             hidden_act="silu", **special)
        dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_sft_jsonl(os.path.join(out, "sft.jsonl"), rows)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run the random init (cuda is much faster for 1B/8B)")
    args = parser.parse_args()
    print(build(args.out, args.shape, args.seed, args.device))


if __name__ == "__main__":
    main()
