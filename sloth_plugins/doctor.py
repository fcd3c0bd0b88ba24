"""``sloth doctor``'s logic: what this machine can run, and what a model would get patched
(the CLI and the studio use it)."""
from __future__ import annotations

import argparse
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Dict, List

from .config import SlothConfig, SlothConfigError, SlothUnsupported, option

_PACKAGES = ("torch", "triton", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "lightning",
             "axolotl", "pluggy")


class DoctorError(Exception):
    """Something ``sloth doctor`` was given that it cannot use: one line on stderr, exit code 2."""


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def machine_info() -> Dict[str, Any]:
    import torch

    from .kernels import triton_status
    info: Dict[str, Any] = {
        "python": platform.python_version(), "platform": f"{platform.machine()} ({platform.system()})",
        "packages": {name: _version(name) for name in _PACKAGES}, "cuda_runtime": None, "cuda_devices": [],
        "triton": triton_status()}
    if torch.cuda.is_available():
        info["cuda_runtime"] = torch.version.cuda
        bf16 = torch.cuda.is_bf16_supported()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["cuda_devices"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                         "capability": f"sm_{p.major}{p.minor}", "bf16": bf16})
    try:
        import bitsandbytes  # noqa: F401
        info["bitsandbytes"] = {"usable": True, "error": None}
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
        info["bitsandbytes"] = {"usable": False, "error": _first_line(exc)}
    return info


def machine_report(info: Dict[str, Any] = None) -> str:
    info = info or machine_info()
    lines = [f"python {info['python']} on {info['platform']}"]
    lines += [f"{name:<13}{v}" for name, v in info["packages"].items()]
    for i, d in enumerate(info["cuda_devices"]):
        lines.append(f"cuda:{i}       {d['name']}, {d['memory_gib']:.1f} GiB, {d['capability']}, "
                     f"bf16={'yes' if d['bf16'] else 'no'}")
    if info["cuda_runtime"]:
        lines.append(f"CUDA runtime {info['cuda_runtime']}")
    else:
        lines.append("CUDA         not available: Triton kernels are GPU-only; the torch reference paths run instead")
    lines.append(f"Triton       {info['triton']}")
    bnb = info["bitsandbytes"]
    lines.append("bitsandbytes importable (QLoRA / NF4 supported)" if bnb["usable"]
                 else f"bitsandbytes not usable: {bnb['error']}")
    return "\n".join(lines)


def parse_set(items: List[str]) -> Dict[str, Any]:
    """``--set KEY=VALUE`` items as SlothConfig options, each value typed by its key's ``Option``
    (config.OPTIONS: the one definition the config's validation and the Axolotl args read too)."""
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DoctorError(f"--set takes KEY=VALUE, e.g. --set gradient_checkpointing=recompute; got {item!r}")
        try:
            options[key.strip()] = option(key.strip()).parse(value)
        except SlothConfigError as exc:
            raise DoctorError(f"--set {item}: {exc}") from None
    return options


def _model_config(model_ref: str):
    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig

    if os.path.isdir(model_ref) or os.path.isfile(model_ref):
        path = os.path.join(model_ref, "config.json") if os.path.isdir(model_ref) else model_ref
        if not os.path.isfile(path):
            raise DoctorError(f"{model_ref} has no config.json: not a Hugging Face model folder")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DoctorError(f"cannot read {path}: not a valid JSON file ({exc})") from None
        model_type = data.get("model_type") if isinstance(data, dict) else None
        if not model_type:
            raise DoctorError(f"{path} has no model_type: not a transformers model config")
        if model_type not in CONFIG_MAPPING:
            raise DoctorError(f"{path}: model_type {model_type!r} is unknown to transformers "
                              f"{transformers.__version__}")
        try:
            return AutoConfig.from_pretrained(model_ref, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a broken config is the user's input, reported in one line
            raise DoctorError(f"cannot load {path}: {_first_line(exc)}") from None
    if model_ref not in CONFIG_MAPPING:
        raise DoctorError(f"{model_ref!r} is neither a local model folder nor a transformers model_type "
                          f"(e.g. llama, qwen2, gemma2)")
    try:
        return CONFIG_MAPPING[model_ref]()
    except Exception as exc:  # noqa: BLE001
        raise DoctorError(f"the default {model_ref} config cannot be built: {_first_line(exc)}") from None


def patch_report(model_ref: str, config: SlothConfig, lora: Dict[str, Any] = None):
    """The PatchReport ``config`` gives the model (built on the meta device: no weights, no memory);
    ``lora``: ``peft.LoraConfig`` arguments to wrap it with first, as a LoRA run does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    from .manager import architecture_table, patch
    model_config = _model_config(model_ref)
    model_type = model_config.model_type
    # A vision-language checkpoint: the class with its vision tower, when the table has a row for it
    # (AutoModelForCausalLM gives some of them the language model alone, Qwen2.5-VL nothing).
    vision_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    vision_arch = architecture_table().lookup(model_type, vision_class) if vision_class else None
    auto = AutoModelForImageTextToText if vision_arch is not None and vision_arch.vision else AutoModelForCausalLM
    if auto is AutoModelForCausalLM and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise DoctorError(f"{model_type} ({type(model_config).__name__}) is not a causal LM: transformers has no "
                          f"AutoModelForCausalLM for it, and sloth_plugins patches causal LMs (llama, qwen2, ...)")
    try:
        with torch.device("meta"):
            model = auto.from_config(model_config)
            if lora is not None:
                from peft import LoraConfig, get_peft_model
                model = get_peft_model(model, LoraConfig(**lora))
    except Exception as exc:  # noqa: BLE001 - e.g. a model that needs a package this machine lacks
        raise DoctorError(f"{auto.__name__}.from_config cannot build {model_type}"
                          f"{' with LoRA' if lora is not None else ''}: {_first_line(exc)}") from None
    try:
        return patch(model, config)
    except (SlothConfigError, SlothUnsupported) as exc:
        raise DoctorError(str(exc)) from None


def doctor(args: argparse.Namespace) -> None:
    try:
        config = SlothConfig(**parse_set(args.set))
    except SlothConfigError as exc:
        raise DoctorError(str(exc)) from None
    report = patch_report(args.model, config) if args.model else None
    info = machine_info()
    if args.json:
        data: Dict[str, Any] = {"machine": info}
        if report is not None:
            data.update(config=config.to_dict(), report=report.to_dict())
        print(json.dumps(data, indent=2, default=str))
        return
    print(machine_report(info))
    if report is not None:
        print()
        print(report)


