"""Scenarios as data: model shape x precision (bf16 | qlora) x batches (fixed | longtail | image:
vision-language) x gradient checkpointing x GPUs, the implementations to compare, and how to measure
(``run``: "train" = timed steps, "longest" = the longest batch-1 sequence within a memory budget).

Named scenarios reproduce what the older scripts measured (e2e.py, padding_free.py,
checkpointing.py, longest_seq.py); ``matrix`` builds the cross-family grid the same way for
every shape (nothing tuned to a named one).
"""
from __future__ import annotations

from typing import Dict, List

from .models import FAMILIES, shape_name

E2E_IMPLS = ["hf_peft", "sloth", "liger", "unsloth"]
# issue 17's matrix: the others, sloth offload (Unsloth's memory), sloth default, sloth default at HF + PEFT's peak
MATRIX_IMPLS = ["hf_peft", "liger", "unsloth", "sloth_offload", "sloth", "sloth_at_hf_peak"]
PF_IMPLS = ["hf_peft", "sloth_packed", "unsloth", "unsloth_packed", "sloth", "sloth_unpad", "hf_peft_packed"]


def fixed(batch: int, seq: int) -> dict:
    return {"kind": "fixed", "batch": batch, "seq": seq}


def longtail(samples: int, micro: int, mean_len: float = 350.0, min_len: int = 32, max_len: int = 2048,
             sigma: float = 1.0, tokens: int = 0) -> dict:
    """``samples`` a step (or as many as fit ``tokens`` real tokens), padded micro-batches of ``micro``."""
    return {"kind": "longtail", "samples": samples, "micro": micro, "mean_len": mean_len, "min_len": min_len,
            "max_len": max_len, "sigma": sigma, "tokens": tokens}


def image(batch: int, text: int, image_tokens: int = 256) -> dict:
    """Vision-language rows: one image of ``image_tokens`` soft tokens, then ``text`` text tokens
    (slothbench.data)."""
    return {"kind": "image", "batch": batch, "text": text, "image_tokens": image_tokens}


def grpo(prompt: int, completion: int, generations: int) -> dict:
    """One prompt of ``prompt`` tokens a micro-batch, ``generations`` completions of ``completion`` tokens."""
    return {"kind": "grpo", "prompt": prompt, "completion": completion, "generations": generations}


def scenario(name: str, model: str, data: dict, impls: List[str], mode: str = "bf16", grad_ckpt: bool = True,
             **more) -> dict:
    return {"name": name, "model": shape_name(model), "mode": mode, "data": data, "grad_ckpt": grad_ckpt,
            "gpus": 1, "impls": impls, "define": {}, "run": "train", "warmup": 3, "steps": 10, "settle": False,
            **more}


def _ckpt(name: str, model: str, data: dict, full: bool = False) -> dict:
    """checkpointing.py's rows: HF without / with checkpointing, and each sloth checkpointing mode
    (checkpointing only, or with kernels and the chunked loss: ``full``). Auto warms up until its
    plan is settled."""
    stack = {} if full else {"kernels": False, "loss": "off"}
    define = {"hf": {"base": "hf", "grad_ckpt": False}, "hf-gc": {"base": "hf"}}
    for mode in ("off", "recompute", "offload", "auto"):
        define[mode] = {"base": "hf", "sloth": {**stack, "gradient_checkpointing": mode}}
    define["auto-40g"] = {"base": "hf", "sloth": {**stack, "gradient_checkpointing": "auto", "memory_budget_gb": 40.0}}
    return scenario(name, model, data, list(define), define=define, settle=True, warmup=3, steps=5)


def _rl(name: str, model: str, run: str, data: dict, mode: str = "bf16") -> dict:
    """TRL's DPO / GRPO trainer alone, with use_liger_kernel, with SlothCallback (default, offload); DPO also
    Unsloth's (GRPO's target is TRL alone, and Unsloth's GRPO path is built around vLLM generation)."""
    from .rl import IMPLS
    impls = [i for i in IMPLS if run == "dpo" or IMPLS[i]["base"] != "unsloth"]
    return scenario(name, model, data, impls, mode=mode, run=run, define=dict(IMPLS), warmup=2, steps=5)


def _deepspeed(name: str, model: str, data: dict, stage: int, offload: bool) -> dict:
    """The HF Trainer under DeepSpeed ZeRO, alone and with SlothCallback (slothbench.rl)."""
    from .rl import DS_IMPLS
    return scenario(name, model, data, list(DS_IMPLS), run="sft", define=dict(DS_IMPLS), warmup=2, steps=4,
                    deepspeed={"stage": stage, "offload": offload})


def _longest(name: str, model: str, mode: str = "bf16") -> dict:
    return scenario(name, model, fixed(1, 8192), ["sloth_offload", "sloth_auto", "unsloth", "hf_peft"], mode=mode,
                    run="longest", longest={"budget_gib": 80.0, "max_seq": 131072, "start_seq": 8192,
                                            "resolution": 1024, "impl_budget_s": 150.0, "auto_max_steps": 3,
                                            "alloc_conf": "expandable_segments:True"})


NAMED: Dict[str, dict] = {s["name"]: s for s in [
    scenario("e2e-1b", "llama-3.2-1b", fixed(8, 2048), E2E_IMPLS),
    scenario("e2e-1b-nogc", "llama-3.2-1b", fixed(8, 2048), E2E_IMPLS, grad_ckpt=False),
    scenario("e2e-8b", "llama-3.1-8b", fixed(2, 2048), E2E_IMPLS),
    scenario("e2e-8b-qlora", "llama-3.1-8b", fixed(2, 2048), E2E_IMPLS, mode="qlora"),
    scenario("e2e-8b-nogc", "llama-3.1-8b", fixed(2, 2048), E2E_IMPLS, grad_ckpt=False),
    # sloth's offloaded checkpointing against Unsloth's (use_gradient_checkpointing="unsloth")
    scenario("e2e-8b-offload", "llama-3.1-8b", fixed(2, 2048), ["sloth_offload", "unsloth"]),
    scenario("e2e-8b-qlora-offload", "llama-3.1-8b", fixed(2, 2048), ["sloth_offload", "unsloth"], mode="qlora"),
    # the host's cost of a step (run with --host-profile): the 8B's 32 layers at 1/16 of its widths
    scenario("e2e-8b-host", "llama-3.1-8b-host", fixed(2, 2048), ["sloth", "unsloth"], mode="qlora"),
    scenario("padding-free-1b", "llama-3.2-1b", longtail(48, 8), PF_IMPLS),
    scenario("padding-free-8b", "llama-3.1-8b", longtail(12, 4), PF_IMPLS),
    _ckpt("ckpt-1b", "llama-3.2-1b", fixed(8, 2048)),
    _ckpt("ckpt-1b-16k", "llama-3.2-1b", fixed(1, 16384)),
    _ckpt("ckpt-1b-full", "llama-3.2-1b", fixed(8, 2048), full=True),
    _ckpt("ckpt-8b", "llama-3.1-8b", fixed(2, 2048)),
    _longest("longest-8b", "llama-3.1-8b"),
    _longest("longest-8b-qlora", "llama-3.1-8b", mode="qlora"),
    # preference / RL training through TRL's trainers (issue 20): PEFT reference, LoRA r16
    _rl("dpo-8b", "llama-3.1-8b", "dpo", fixed(2, 2048)),
    _rl("dpo-8b-qlora", "llama-3.1-8b", "dpo", fixed(2, 2048), mode="qlora"),
    _rl("grpo-1b", "llama-3.2-1b", "grpo", grpo(prompt=256, completion=512, generations=8)),
    # DeepSpeed (issue 22): ZeRO-3 with parameters and optimizer state offloaded to the CPU, LoRA r16
    _deepspeed("zero3-offload-8b", "llama-3.1-8b", fixed(2, 2048), stage=3, offload=True),
    # vision-language (issue 19): bs 2, each row a 256-token image (Gemma 3: 896 px; Qwen2.5-VL: 448 px) then
    # 1792 text tokens; LoRA on the language model, the vision tower frozen
    scenario("vl-gemma3-4b", "gemma-3-4b-vl", image(2, 1792), E2E_IMPLS),
    scenario("vl-qwen2.5-vl-7b", "qwen2.5-vl-7b", image(2, 1792), E2E_IMPLS),
    # mixture of experts (issue 19): all 48 layers, bf16 base, LoRA on attention and (target_parameters) on the
    # experts' 3-D weights; the model folder is 57 GiB, so creating it deletes the other cached models
    scenario("moe-qwen3-30b-a3b", "qwen3-30b-a3b", fixed(2, 2048), E2E_IMPLS),
    # 2 GPUs: HF Trainer + SlothCallback under torchrun DDP (benchmarks/multi_gpu_train.py), 2 x 2048 a GPU
    scenario("ddp-8b", "llama-3.1-8b", fixed(2, 2048), ["sloth"], gpus=2, warmup=3, steps=20),
]}


def matrix(families: List[str], modes: List[str], data: str = "fixed", grad_ckpt: bool = True,
           impls: List[str] = MATRIX_IMPLS, batch: int = 2, seq: int = 2048) -> List[dict]:
    """One scenario per family x mode, all alike: bs ``batch`` x ``seq`` (fixed) or the long-tailed
    set at 12 samples a step in micro-batches of 4 (longtail)."""
    families = FAMILIES if families in (["all"], "all") else [shape_name(f) for f in families]
    out = []
    for family in families:
        for mode in modes:
            if mode not in ("bf16", "qlora", "fp16"):
                raise SystemExit(f"unknown mode {mode!r}: bf16, qlora or fp16")
            name = f"{family}-{mode}" + ("-longtail" if data == "longtail" else "") + ("" if grad_ckpt else "-nogc")
            shape = fixed(batch, seq) if data == "fixed" else longtail(12, 4, max_len=seq)
            out.append(scenario(name, family, shape, list(impls), mode=mode, grad_ckpt=grad_ckpt))
    return out


def with_measured_budget(spec: dict, rows: List[dict], scenario_name: str):
    """(spec, None) with ``memory_budget_gb`` set to the peak that ``spec["budget_from"]`` measured in
    this scenario, or (None, why) when that row is missing or has no peak. Specs without
    ``budget_from`` come back unchanged."""
    source = spec.get("budget_from")
    if not source:
        return spec, None
    row = next((r for r in rows if (r.get("scenario"), r.get("impl")) == (scenario_name, source)), None)
    peak = row.get("peak_gib") if row and row.get("ok") else None
    if not peak:
        return None, f"needs {source}'s measured peak memory in this scenario (run {source} first, on a GPU)"
    return {**spec, "sloth": {**(spec.get("sloth") or {}), "memory_budget_gb": round(float(peak), 2)}}, None
