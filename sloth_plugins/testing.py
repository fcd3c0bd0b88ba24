"""Tiny models, a locally trained tokenizer and the shipped data: for tests, examples, smoke runs.

Nothing here touches a hub: configs are built in code, tokenizers trained on local text.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
# Mixture-of-experts families of the table (tiny: 4 experts, top-2).
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
# Causal LMs without an architecture entry: what the generic paths must get right.
UNKNOWN_FAMILIES = ("gpt2", "opt", "custom")
# package data (pyproject: tool.setuptools.package-data), so it is there in a wheel install too
DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_instructions.jsonl")
PROMPT = "### Instruction:\n{instruction}\n### Response:\n"


def load_instructions(path: Optional[str] = None, limit: Optional[int] = None) -> List[dict]:
    """The instruction set shipped with the package (sloth_plugins/data/tiny_instructions.jsonl)."""
    path = path or DATA_FILE
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def format_example(row: dict) -> str:
    return PROMPT.format(instruction=row["instruction"]) + row["response"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="right")


def tiny_config(family: str = "llama", vocab_size: int = 384, hidden_size: int = 64, layers: int = 2,
                **overrides):
    """A small config of one of FAMILIES, built from transformers' own config class."""
    from transformers import CONFIG_MAPPING

    if family not in FAMILIES + MOE_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES + MOE_FAMILIES)}")
    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
    if family in ("gemma", "gemma2", "gemma3_text", "qwen3", "qwen3_moe"):
        kw["head_dim"] = hidden_size // 4
    if family == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)
    elif family in MOE_FAMILIES:
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size, decoder_sparse_step=1,
                  mlp_only_layers=[], norm_topk_prob=True)
    if family == "qwen2_moe":
        kw["shared_expert_intermediate_size"] = 2 * hidden_size
    if family in ("gemma2", "gemma3_text"):
        kw.update(final_logit_softcapping=30.0, sliding_window=64, query_pre_attn_scalar=hidden_size // 4)
    if family == "gemma3_text":
        kw["layer_types"] = ["sliding_attention", "full_attention"][:layers] + ["full_attention"] * max(0, layers - 2)
    kw.update(overrides)
    return CONFIG_MAPPING[family](**kw)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_overrides), dtype=dtype)
    return model


def probe_model(family: str = "llama", seed: int = 0, **overrides):
    """A tiny model of FAMILIES or UNKNOWN_FAMILIES ("custom": a Llama registered under a model_type
    no table knows), dropout off, built from ``seed``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, LlamaForCausalLM, OPTConfig

    if family not in UNKNOWN_FAMILIES:
        return tiny_model(family, seed=seed, **overrides)
    torch.manual_seed(seed)
    small = dict(vocab_size=384, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **small)
    elif family == "opt":
        config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
                           **small)
    else:
        class CustomConfig(LlamaConfig):
            model_type = "sloth_custom_llm"

        class CustomForCausalLM(LlamaForCausalLM):
            config_class = CustomConfig

        return CustomForCausalLM(CustomConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=128, **small, **overrides))
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config)


def with_lora(model, seed: int = 7, **lora_options):
    """PEFT LoRA on all linear layers, B initialised away from zero so the adapters change the outputs."""
    from peft import LoraConfig, get_peft_model

    options = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    options.update(lora_options)
    peft_model = get_peft_model(model, LoraConfig(**options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
    return peft_model


def right_pad_collate(rows: List[dict]) -> dict:
    """Rows of ``input_ids`` tensors, right-padded: pad id 0, attention mask 0, label -100."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = r["input_ids"]
        mask[i, :len(r["input_ids"])] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


class MicroLossRecorder:
    """Mixin for a (real) HF/TRL Trainer class: records each micro-batch's loss at full
    precision, since the Trainer's logs round it. ``class T(MicroLossRecorder, Trainer)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_losses = []

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.micro_losses.append(loss.item())
        return loss


def save_tiny_model_folder(path: str, family: str = "llama", seed: int = 0) -> str:
    """A tiny model and its tokenizer (trained on the shipped instructions, with a chat template)
    saved as a local model folder: what ``from_pretrained(path)`` and ``sloth studio`` load."""
    tokenizer = train_tokenizer(format_example(r) for r in load_instructions())
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A minimal chat template for the tiny tokenizer (role headers, the eos token after each turn).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
