"""Model shapes and implementations as data; one loader.

SHAPES: the public shapes of every family in the architecture table (DESIGN.md section 6), plus
``tiny`` (tests, --smoke) and ``llama-3.1-8b-host`` (the 8B's 32 layers at 1/16 of its widths:
the GPU always waits for the host, so a step's time is the host cost). RoPE is the default type
with each model's theta everywhere (Llama-3's "llama3" and Gemma-3's linear scaling only change the
cos/sin tables, not the cost, and keep every implementation on its default rotary path). Nothing
here is tuned to a shape: every scenario treats every shape alike. Vision-language shapes (VISION:
Gemma-3-4B multimodal = the 4B text shape + SigLIP-400M at 896 px, 256 soft tokens an image;
Qwen2.5-VL-7B = the 7B text shape with multimodal RoPE + its 32-layer ViT) load through
AutoModelForImageTextToText; their ``tiny-*`` shapes (--smoke) are sloth_plugins.testing.tiny_vl_config.

IMPLS: how each implementation loads (base "hf" = transformers + PEFT, optionally Liger's
patches or sloth_plugins.patch(model, SlothConfig(**sloth)); base "unsloth" = FastLanguageModel)
and which batch layout it gets (padded or packed). LoRA r16 alpha16 dropout 0 on every projection
(vision-language models: the language model's only, the vision tower frozen; Unsloth: FastVisionModel);
QLoRA = bitsandbytes NF4, double quant, bf16 compute (no prepare_model_for_kbit_training: norms
and lm_head stay bf16, as Unsloth keeps them).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import List, Optional

_LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                 max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0)
_GEMMA3_4B = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, vocab_size=262208, tie_word_embeddings=True,
                  max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1e6, query_pre_attn_scalar=256,
                  sliding_window=1024)
_SIGLIP_400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14)
_QWEN25_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
_QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                         fullatt_block_indexes=[7, 15, 23, 31])
# Mixture of experts (issue 19): the public configs' shapes; transformers' fused 3-D expert weights
_QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                      num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                      vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=40960,
                      rms_norm_eps=1e-6, rope_theta=1e6)
TESTING = "sloth_plugins.testing.tiny_vl_config"    # a shape's keys: that function's config of its model_type
TINY_TEXT = "sloth_plugins.testing.tiny_config"     # the same for the text families' test models
SHAPES = {   # name: (model_type, config keys)
    "llama-3.2-1b": ("llama", dict(_LLAMA_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   head_dim=64, tie_word_embeddings=True)),
    "llama-3.2-3b": ("llama", dict(_LLAMA_8B, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, tie_word_embeddings=True)),
    "llama-3.1-8b": ("llama", _LLAMA_8B),
    "mistral-7b-v0.3": ("mistral", dict(_LLAMA_8B, vocab_size=32768, max_position_embeddings=32768,
                                        rope_theta=1e6, sliding_window=None)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-6,
                                 rope_theta=1e6, use_sliding_window=False)),
    "qwen3-8b": ("qwen3", dict(_LLAMA_8B, intermediate_size=12288, num_hidden_layers=36, vocab_size=151936,
                               max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6)),
    "gemma-2-9b": ("gemma2", dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                                  tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-6,
                                  rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                  hidden_activation="gelu_pytorch_tanh")),
    "gemma-3-4b": ("gemma3_text", _GEMMA3_4B),
    "phi-3-mini": ("phi3", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                rope_theta=10000.0, sliding_window=2047)),
    # vision-language (image + text batches: slothbench.data's "image" kind)
    "gemma-3-4b-vl": ("gemma3", dict(text_config=dict(_GEMMA3_4B, final_logit_softcapping=None),
                                     vision_config=_SIGLIP_400M, mm_tokens_per_image=256, image_token_index=262144,
                                     boi_token_index=255999, eoi_token_index=256000)),
    "qwen2.5-vl-7b": ("qwen2_5_vl", dict(text_config=_QWEN25_7B_TEXT, vision_config=_QWEN25_VL_VISION,
                                         image_token_id=151655, vision_start_token_id=151652,
                                         vision_end_token_id=151653)),
    "qwen3-30b-a3b": ("qwen3_moe", _QWEN3_30B_A3B),
    # not public shapes: the host-cost probe and the test models
    "llama-3.1-8b-host": ("llama", dict(_LLAMA_8B, hidden_size=256, intermediate_size=896, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=64, vocab_size=2048,
                                        max_position_embeddings=8192)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
                           max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0)),
    "tiny-gemma3-vl": ("gemma3", TESTING),
    "tiny-qwen2.5-vl": ("qwen2_5_vl", TESTING),
    "tiny-qwen3-moe": ("qwen3_moe", TINY_TEXT),
}
VISION = [n for n, (_, keys) in SHAPES.items() if keys == TESTING or "vision_config" in keys]
MOE = [n for n, (_, keys) in SHAPES.items() if isinstance(keys, dict) and "num_experts_per_tok" in keys]
FAMILIES = [n for n, (_, keys) in SHAPES.items()
            if n not in ("llama-3.1-8b-host", "tiny") and n not in VISION + MOE and keys != TINY_TEXT]
ALIASES = {"llama-1b": "llama-3.2-1b", "llama-3b": "llama-3.2-3b", "llama-8b": "llama-3.1-8b",
           "llama-8b-host": "llama-3.1-8b-host"}
_LANGUAGE_MODEL = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "gemma3": _LANGUAGE_MODEL,
                "qwen2_5_vl": _LANGUAGE_MODEL, "qwen3_moe": _ATTENTION}
DEFAULT_TARGETS = _ATTENTION + ["gate_proj", "up_proj", "down_proj"]
# MoE: LoRA on the 3-D expert weights too, through PEFT's target_parameters (the router stays frozen)
LORA_PARAMETERS = {"qwen3_moe": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}

IMPLS = {
    "hf_peft": dict(base="hf"),
    "hf_peft_packed": dict(base="hf", layout="packed"),
    "liger": dict(base="hf", liger=True),
    "unsloth": dict(base="unsloth"),
    "unsloth_packed": dict(base="unsloth", layout="packed"),
    "sloth": dict(base="hf", sloth={}),
    "sloth_packed": dict(base="hf", sloth={"padding_free": True}, layout="packed"),
    "sloth_unpad": dict(base="hf", sloth={"padding_free": True}),     # padded in, packed inside the forward
    "sloth_offload": dict(base="hf", sloth={"gradient_checkpointing": "offload"}),
    "sloth_auto": dict(base="hf", sloth={"gradient_checkpointing": "auto"}),
    # sloth's default `auto` held to HF + PEFT's measured peak in the same scenario (budget_from: run it first)
    "sloth_at_hf_peak": dict(base="hf", sloth={"gradient_checkpointing": "auto"}, budget_from="hf_peft"),
}
NEEDS = {"hf": ["transformers", "peft"], "unsloth": ["unsloth", "peft"]}


def shape_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in SHAPES:
        raise SystemExit(f"unknown model {name!r}; choose from {sorted(SHAPES)} or aliases {sorted(ALIASES)}")
    return name


def lora_targets(model_type: str):
    return LORA_TARGETS.get(model_type, DEFAULT_TARGETS)


def lora_parameters(model_type: str) -> Optional[List[str]]:
    return LORA_PARAMETERS.get(model_type)


def smoke_shape(name: str) -> str:
    """The test model standing in for a shape under --smoke: the tiny one of its model type, else ``tiny``."""
    model_type = SHAPES[shape_name(name)][0]
    return next((n for n, (t, keys) in SHAPES.items() if keys in (TESTING, TINY_TEXT) and t == model_type), "tiny")


def text_config(cfg: dict) -> dict:
    """The language model's keys of a config dict (a vision-language config's text_config)."""
    return cfg.get("text_config") or cfg


def is_vision(cfg) -> bool:
    return "vision_config" in (cfg if isinstance(cfg, dict) else cfg.to_dict())


def build_config(name: str, **extra):
    """The transformers config of a shape (``extra``: token ids, overrides; a vision-language
    shape's go into its text_config)."""
    from transformers import AutoConfig
    model_type, keys = SHAPES[shape_name(name)]
    if keys == TESTING:
        from sloth_plugins.testing import tiny_vl_config
        return tiny_vl_config(model_type, **{k: v for k, v in extra.items() if v is not None})
    if keys == TINY_TEXT:
        from sloth_plugins.testing import tiny_config
        return tiny_config(model_type, **{k: v for k, v in extra.items() if v is not None})
    if "text_config" in keys:
        return AutoConfig.for_model(model_type, **{**keys, "text_config": {**keys["text_config"], **extra}})
    keys = {k: v for k, v in {**keys, **extra}.items() if v is not None or k == "sliding_window"}
    return AutoConfig.for_model(model_type, **keys)


def auto_class(cfg):
    """AutoModelForImageTextToText for a vision-language config, else AutoModelForCausalLM."""
    import transformers
    return transformers.AutoModelForImageTextToText if is_vision(cfg) else transformers.AutoModelForCausalLM


def matmul_flops(cfg: dict, seq: int = 0) -> dict:
    """N_matmul = parameters of every linear layer incl. lm_head (LoRA adapters excluded; MoE: the top-k
    experts a token runs through, and the router); per-token
    LoRA training FLOPs = 4 N_matmul (forward + input gradients; frozen weights get no weight
    gradient) + 6 L seq d (attention scores, as DESIGN.md counts them). A vision-language config:
    its language model's (the vision tower's FLOPs are not counted)."""
    cfg = text_config(cfg)
    d, n_layers, inter, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    hq, hk = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // hq
    if cfg.get("num_experts_per_tok"):       # MoE: the experts a token runs through, and its router
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        inter = cfg.get("moe_intermediate_size") or inter
        mlp = cfg["num_experts_per_tok"] * 3 * d * inter + d * experts
    else:
        mlp = 3 * d * inter
    n_matmul = n_layers * (d * hq * hd + 2 * d * hk * hd + hq * hd * d + mlp) + vocab * d
    return {"n_matmul": n_matmul, "flops_per_token": 4 * n_matmul + 6 * n_layers * seq * d}


def missing_modules(spec: dict, qlora: bool, device: str) -> List[str]:
    needed = NEEDS[spec["base"]] + (["liger_kernel"] if spec.get("liger") else []) + \
        (["sloth_plugins"] if spec.get("sloth") is not None else []) + (["bitsandbytes"] if qlora else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if (spec["base"] == "unsloth" or spec.get("liger")) and device == "cpu":
        missing.append("a CUDA GPU")
    return missing


# ---------------------------------------------------------------------------------------- create

def _tokenizer():
    """A small byte-level BPE trained here (no hub): Unsloth's loader wants a tokenizer in the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = [f"The quick brown fox {i} jumps over the lazy dog number {i * 7}." for i in range(64)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def create(name: str, target: Path, device, dtype, seed: int = 0) -> dict:
    """Random-init model + tokenizer saved to ``target`` (with bench_meta.json), atomically."""
    import torch
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not (target / "bench_meta.json").exists():
        raise SystemExit(f"refusing to replace {target}: it exists and was not made by this benchmark")
    t0 = time.perf_counter()
    tok = _tokenizer()
    config = build_config(name, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):          # random init on the GPU: minutes faster than CPU for 8B
            model = auto_class(config).from_config(config)
    finally:
        torch.set_default_dtype(old)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    make_room(target.parent, sum(p.numel() * p.element_size() for p in model.parameters()))
    model.save_pretrained(tmp, max_shard_size="5GB")
    tok.save_pretrained(tmp)
    meta = {"model": shape_name(name), "model_type": SHAPES[shape_name(name)][0], "shape": SHAPES[shape_name(name)][1],
            "seed": seed, "dtype": str(dtype).replace("torch.", ""),
            "params": sum(p.numel() for p in model.parameters()), "created_s": round(time.perf_counter() - t0, 1)}
    (tmp / "bench_meta.json").write_text(json.dumps(meta, indent=2))
    tmp.rename(target)
    return meta


def make_room(cache: Path, need: int, margin: int = 2 << 30) -> List[str]:
    """Free ``need`` bytes (+ margin) on ``cache``'s disk for a new model folder by deleting the other
    folders this benchmark made there (they have a bench_meta.json), least recently used first; the names
    deleted. A 30B model's folder is most of a 64 GiB disk: the 8B one cached beside it has to go."""
    cache.mkdir(parents=True, exist_ok=True)
    ours = sorted((d for d in cache.iterdir() if (d / "bench_meta.json").is_file()),
                  key=lambda d: (d / "bench_meta.json").stat().st_atime)
    removed = []
    while shutil.disk_usage(cache).free < need + margin and ours:
        victim = ours.pop(0)
        for view in cache.glob(f"{victim.name}-maxpos*"):      # long_context_view's symlink folders
            shutil.rmtree(view, ignore_errors=True)
        shutil.rmtree(victim, ignore_errors=True)
        removed.append(victim.name)
        print(f"model: deleted {victim} to make room ({need / 2**30:.1f} GiB needed)", flush=True)
    if shutil.disk_usage(cache).free < need + margin:
        raise SystemExit(f"not enough disk under {cache} for a {need / 2**30:.1f} GiB model: "
                         f"{shutil.disk_usage(cache).free / 2**30:.1f} GiB free after deleting {removed or 'nothing'}")
    return removed


def long_context_view(model_dir: Path, max_seq: int) -> Path:
    """The model folder itself when its config allows ``max_seq`` positions, else a sibling with
    symlinks to its files and a config saying max_position_embeddings = max_seq (so no library
    applies RoPE scaling for long inputs)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("max_position_embeddings", 0) >= max_seq:
        return model_dir
    view = model_dir.with_name(f"{model_dir.name}-maxpos{max_seq}")
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and f.is_file():
            (view / f.name).symlink_to(f.resolve())
    cfg["max_position_embeddings"] = max_seq
    (view / "config.json").write_text(json.dumps(cfg, indent=2))
    return view


# ------------------------------------------------------------------------------------------ load

def sloth_options(spec: dict, extra: Optional[dict] = None) -> dict:
    """The impl's SlothConfig keys, then --sloth-config's, then SLOTH_BENCH_CONFIG's (older commands)."""
    return {**spec["sloth"], **(extra or {}), **json.loads(os.environ.get("SLOTH_BENCH_CONFIG") or "{}")}


def load(spec: dict, model_dir, device, dtype, *, qlora: bool, grad_ckpt: bool, seed: int, max_seq: int,
         lora_r: int = 16, lora_alpha: int = 16, sloth_extra: Optional[dict] = None, unsloth_gc: str = "unsloth"):
    """(model in training mode with LoRA adapters, info dict) for one implementation spec."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    model_type, vision = cfg["model_type"], is_vision(cfg)
    targets = lora_targets(model_type)
    if spec["base"] == "unsloth" and vision:
        from unsloth import FastVisionModel
        gc = (unsloth_gc if unsloth_gc == "unsloth" else True) if grad_ckpt else False
        model, _tok = FastVisionModel.from_pretrained(
            model_name=str(model_dir), max_seq_length=max_seq, dtype=dtype, load_in_4bit=qlora,
            use_gradient_checkpointing=gc, random_state=seed)
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
            finetune_mlp_modules=True, r=lora_r, lora_alpha=lora_alpha, lora_dropout=0, bias="none",
            use_gradient_checkpointing=gc, random_state=seed)
        FastVisionModel.for_training(model, use_gradient_checkpointing=gc)
        return model, {"gradient_checkpointing": f"unsloth use_gradient_checkpointing={gc!r}",
                       "unsloth_max_seq_length": max_seq, "unsloth_loader": "FastVisionModel"}
    if spec["base"] == "unsloth":
        from unsloth import FastLanguageModel
        gc = (unsloth_gc if unsloth_gc == "unsloth" else True) if grad_ckpt else False
        model, _tok = FastLanguageModel.from_pretrained(
            model_name=str(model_dir), max_seq_length=max_seq, dtype=dtype, load_in_4bit=qlora,
            use_gradient_checkpointing=gc, random_state=seed)
        model = FastLanguageModel.get_peft_model(
            model, r=lora_r, lora_alpha=lora_alpha, lora_dropout=0, bias="none", target_modules=targets,
            target_parameters=lora_parameters(model_type), use_gradient_checkpointing=gc, random_state=seed)
        FastLanguageModel.for_training(model, use_gradient_checkpointing=gc)
        return model, {"gradient_checkpointing": f"unsloth use_gradient_checkpointing={gc!r}",
                       "unsloth_max_seq_length": max_seq}

    import torch
    from peft import LoraConfig, get_peft_model
    info = {}
    if spec.get("liger"):
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel
        _apply_liger_kernel(model_type)      # class-level, its defaults: rope, rms_norm, swiglu, fused linear CE
        info["liger"] = f"_apply_liger_kernel({model_type!r}) defaults"
    kw = dict(dtype=dtype, attn_implementation="sdpa")
    if qlora:
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if qlora or device.type == "cuda":
        kw["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    model = auto_class(cfg).from_pretrained(str(model_dir), **kw)
    if not qlora and device.type != "cuda":
        model.to(device)
    model.config.use_cache = False
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        info["gradient_checkpointing"] = "HF gradient_checkpointing_enable(use_reentrant=False)"
    torch.manual_seed(seed)                # the same LoRA A init for every HF-based impl
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, bias="none",
                                             target_modules=targets, target_parameters=lora_parameters(model_type),
                                             task_type="CAUSAL_LM"))
    if spec.get("sloth") is not None:
        import sloth_plugins as sloth
        options = sloth_options(spec, sloth_extra)
        report = sloth.patch(model, sloth.SlothConfig(**options))
        info.update(sloth_config=options, patch_report=report.summary(), patch_notes=list(report.notes))
    model.train()
    return model, info
