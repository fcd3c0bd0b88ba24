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
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "glm4_moe")
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
    elif family == "glm4_moe":      # layer 0 dense (first_k_dense_replace), one shared expert, qk-norm on
        kw.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size, n_shared_experts=1,
                  first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, use_qk_norm=True,
                  head_dim=hidden_size // 4)
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


# ---- vision-language models (issue 19) -----------------------------------------------------------
# model_type -> transformers class; tiny configs built from the family's own config classes.
VL_FAMILIES = {"gemma3": "Gemma3ForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "qwen3_vl": "Qwen3VLForConditionalGeneration", "mllama": "MllamaForConditionalGeneration",
               "llama4": "Llama4ForConditionalGeneration"}
_VL_VOCAB = 128
_IMAGE, _START, _END = _VL_VOCAB - 1, _VL_VOCAB - 3, _VL_VOCAB - 2   # image token, image start / end markers


def _vl_text(**overrides) -> dict:
    kw = dict(vocab_size=_VL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    return kw


def tiny_vl_config(family: str, **text_overrides):
    """A small config of a vision-language family (VL_FAMILIES): 2 text layers, a 1-2 layer vision tower
    on tiny images; image token id 127 (vocab 128)."""
    from transformers import CONFIG_MAPPING

    if family not in VL_FAMILIES:
        raise ValueError(f"unknown vision-language family {family!r}; choose from {', '.join(VL_FAMILIES)}")
    markers = dict(image_token_id=_IMAGE, vision_start_token_id=_START, vision_end_token_id=_END,
                   video_token_id=_VL_VOCAB - 4)
    if family == "gemma3":
        layers = text_overrides.get("num_hidden_layers", 2)
        kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        text = _vl_text(**{**dict(head_dim=16, final_logit_softcapping=30.0, sliding_window=64,
                                  query_pre_attn_scalar=16, layer_types=kinds), **text_overrides})
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)
        return CONFIG_MAPPING["gemma3"](text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                        image_token_index=_IMAGE, boi_token_index=_START, eoi_token_index=_END)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        # mrope sections (temporal, height, width) cover half the head dim: [2, 3, 3] at 16, [16, 24, 24] at 128
        shape = _vl_text(**{**({"head_dim": 16} if family == "qwen3_vl" else {}), **text_overrides})
        half = shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"]) // 2
        temporal = half // 4
        height = (half - temporal) // 2
        rope = {"rope_type": "default", "mrope_section": [temporal, height, half - temporal - height],
                "rope_theta": 10000.0}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2,
                      out_hidden_size=text_overrides.get("hidden_size", 64))
        if family == "qwen2_5_vl":
            vision.update(window_size=16, fullatt_block_indexes=[1])
            text = _vl_text(rope_parameters=rope, **text_overrides)
        else:
            vision.update(num_position_embeddings=16, deepstack_visual_indexes=[0])
            text = _vl_text(**{**dict(head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True)),
                               **text_overrides})
        return CONFIG_MAPPING[family](text_config=text, vision_config=vision, **markers)
    if family == "mllama":
        text = _vl_text(cross_attention_layers=[1], **text_overrides)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                      attention_heads=2, image_size=16, patch_size=8, max_num_tiles=2,
                      intermediate_layers_indices=[0], vision_output_dim=64, supported_aspect_ratios=[[1, 1], [1, 2]])
        return CONFIG_MAPPING["mllama"](text_config=text, vision_config=vision, image_token_index=_IMAGE)
    text = _vl_text(**{**dict(head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
                              interleave_moe_layer_step=2, attention_chunk_size=64), **text_overrides})
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=8, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
                  pixel_shuffle_ratio=0.5)
    return CONFIG_MAPPING["llama4"](text_config=text, vision_config=vision, image_token_index=_IMAGE,
                                    boi_token_index=_START, eoi_token_index=_END)


def tiny_vl_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **text_overrides):
    import transformers

    config = tiny_vl_config(family, **text_overrides)
    torch.manual_seed(seed)
    return getattr(transformers, VL_FAMILIES[family])(config).to(dtype)


def vl_batch(family: str, batch: int = 2, text_tokens: int = 10, seed: int = 0, pad: int = 3,
             mask_image_labels: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    """An image+text training batch for ``tiny_vl_model(family)``: one random image per row, the image
    placeholder tokens the family's processor would put in the text (their count matching the vision
    tower's output), random text, the last row right-padded by ``pad`` tokens. Labels are the input ids
    with -100 at padding and, with ``mask_image_labels`` (what HF processors' collators do), at the
    image tokens and their markers."""
    g = torch.Generator().manual_seed(seed)
    extra: dict = {}
    if family == "gemma3":
        image = [_START] + [_IMAGE] * 4 + [_END]
        extra["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=g)
    elif family in ("qwen2_5_vl", "qwen3_vl"):
        image = [_START] + [_IMAGE] * 4 + [_END]               # a 4x4 patch grid merged 2x2: 4 tokens
        extra["pixel_values"] = torch.randn(batch * 16, 3 * 2 * 4 * 4, generator=g)
        extra["image_grid_thw"] = torch.tensor([[1, 4, 4]] * batch)
    elif family == "mllama":
        image = [_IMAGE]
        extra["pixel_values"] = torch.randn(batch, 1, 2, 3, 16, 16, generator=g)
        extra["aspect_ratio_ids"] = torch.ones(batch, 1, dtype=torch.long)          # (1, 1): one tile
        extra["aspect_ratio_mask"] = torch.tensor([[[1, 0]]] * batch)
    else:
        image = [_START, _IMAGE, _END]                        # 16x16 image, 8x8 patches, shuffle 0.5: 1 token
        extra["pixel_values"] = torch.randn(batch, 3, 16, 16, generator=g)
    rows = [[1] + image + torch.randint(3, _VL_VOCAB - 8, (text_tokens,), generator=g).tolist()
            for _ in range(batch)]
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    if pad:
        ids[-1, -pad:] = 0
        mask[-1, -pad:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if mask_image_labels:
        for token in (_IMAGE, _START, _END):
            labels = labels.masked_fill(ids == token, -100)
    out = dict(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    if family == "gemma3":
        out["token_type_ids"] = (ids == _IMAGE).long()
    if family in ("qwen2_5_vl", "qwen3_vl") and _accepts(family, "mm_token_type_ids"):
        out["mm_token_type_ids"] = (ids == _IMAGE).long()     # what the processor returns (newer transformers)
    if family == "mllama":
        cross = torch.zeros(batch, ids.shape[1], 1, 2, dtype=torch.long)
        cross[:, 1:, :, 0] = 1                                  # text after the image attends to its tile
        out["cross_attention_mask"] = cross
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def _accepts(family: str, argument: str) -> bool:
    import inspect

    import transformers
    return argument in inspect.signature(getattr(transformers, VL_FAMILIES[family]).forward).parameters
