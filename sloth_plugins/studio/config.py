"""A studio run's configuration (config.json): defaults, meanings, validation.

    {"name": str, "model": "/path/to/model/folder" (or a hub id where a network exists),
     "dataset": {"file": "data/x.jsonl", "mapping": {"format": "alpaca", "instruction": ..., ...}},
     "method": "lora" | "qlora" | "full",
     "lora": {"r", "alpha", "dropout", "target_modules"},
     "sloth": {SlothConfig keys},
     "training": {TRAINING keys}}
"""
from __future__ import annotations

import copy
from typing import Any, Dict

from ..config import OPTIONS, SlothConfig, SlothConfigError

METHODS = ("lora", "qlora", "full")
PRECISIONS = ("fp32", "bf16", "fp16")

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}

# key: (default, meaning)
TRAINING = {
    "max_steps": (30, "optimizer steps to train (-1: use num_train_epochs)"),
    "num_train_epochs": (1.0, "passes over the dataset when max_steps is -1"),
    "learning_rate": (2e-4, "peak learning rate"),
    "lr_scheduler_type": ("linear", "learning-rate schedule: linear, cosine, constant, ..."),
    "warmup_steps": (0, "steps of linear warm-up"),
    "per_device_train_batch_size": (4, "rows per micro-batch"),
    "gradient_accumulation_steps": (1, "micro-batches per optimizer step"),
    "max_length": (256, "tokens per row; longer rows are cut"),
    "packing": (False, "pack several rows into one sequence of max_length"),
    "padding_free": (False, "train on one packed row of the real tokens, no padding"),
    "seed": (0, "random seed (model init of new weights, data order, dropout)"),
    "precision": ("fp32", "fp32, bf16 or fp16 (bf16/fp16 need a GPU)"),
    "save_steps": (10, "save a checkpoint (to resume from) every N steps"),
    "logging_steps": (1, "log loss, learning rate, tokens/s and memory every N steps"),
    "report_to": ([], "trackers for the Trainer's logs: tensorboard, trackio, wandb"),
}

# a sloth key's meaning, beside its field: from the one definition of the options
SLOTH_MEANINGS = {o.name: o.help for o in OPTIONS}


def default_run_config(model: str = "", mapping: Dict[str, Any] = None) -> Dict[str, Any]:
    return {"name": "", "model": model,
            "dataset": {"file": "", "mapping": mapping or {"format": "text", "text": "text"}},
            "method": "lora", "lora": dict(LORA), "sloth": SlothConfig().to_dict(),
            "training": {k: copy.deepcopy(v[0]) for k, v in TRAINING.items()}}


def check_run_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """``config`` with defaults filled in; ValueError (with the key) when a value cannot work."""
    full = default_run_config()
    unknown = set(config) - set(full)
    if unknown:
        raise ValueError(f"unknown run config key(s): {', '.join(sorted(unknown))}")
    for key, value in config.items():
        full[key] = {**full[key], **value} if isinstance(full[key], dict) else value
    if not full["model"]:
        raise ValueError("model: give a local model folder (or a hub id)")
    if full["method"] not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {full['method']!r}")
    unknown = set(full["training"]) - set(TRAINING)
    if unknown:
        raise ValueError(f"unknown training key(s): {', '.join(sorted(unknown))}; valid: {', '.join(TRAINING)}")
    if full["training"]["precision"] not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
    try:
        SlothConfig(**full["sloth"])
    except SlothConfigError as exc:
        raise ValueError(f"sloth: {exc}") from None
    return full


def sft_config_kwargs(training: Dict[str, Any]) -> Dict[str, Any]:
    """The ``SFTConfig`` arguments that decide the training (the worker and the exported script share
    them; output, saving and device are each one's own)."""
    t = training
    return dict(max_steps=t["max_steps"], num_train_epochs=t["num_train_epochs"], learning_rate=t["learning_rate"],
                lr_scheduler_type=t["lr_scheduler_type"], warmup_steps=t["warmup_steps"],
                per_device_train_batch_size=t["per_device_train_batch_size"],
                gradient_accumulation_steps=t["gradient_accumulation_steps"], max_length=t["max_length"],
                packing=t["packing"], padding_free=t["padding_free"], seed=t["seed"],
                bf16=t["precision"] == "bf16", fp16=t["precision"] == "fp16", dataset_text_field="text",
                logging_steps=t["logging_steps"], report_to=t["report_to"] or "none")


def lora_config_kwargs(lora: Dict[str, Any]) -> Dict[str, Any]:
    return dict(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                target_modules=lora["target_modules"], task_type="CAUSAL_LM")
