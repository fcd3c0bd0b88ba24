"""``sloth doctor``: what this machine can run, and what a model would get patched."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("torch", "triton", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "lightning",
             "axolotl", "pluggy")


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_report() -> str:
    import torch

    from .kernels import triton_status
    lines = [f"python {platform.python_version()} on {platform.machine()} ({platform.system()})"]
    lines += [f"{name:<13}{_version(name)}" for name in _PACKAGES]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}       {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                         f"bf16={'yes' if torch.cuda.is_bf16_supported() else 'no'}")
        lines.append(f"CUDA runtime {torch.version.cuda}")
    else:
        lines.append("CUDA         not available: Triton kernels are GPU-only; the torch reference paths run instead")
    lines.append(f"Triton       {triton_status()}")
    try:
        import bitsandbytes  # noqa: F401
        lines.append("bitsandbytes importable (QLoRA / NF4 supported)")
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
        lines.append(f"bitsandbytes not usable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return "\n".join(lines)


def model_report(model_ref: str, options: dict) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, CONFIG_MAPPING

    from .config import SlothConfig
    from .manager import patch
    if os.path.isdir(model_ref) or os.path.isfile(model_ref):
        config = AutoConfig.from_pretrained(model_ref, local_files_only=True)
    elif model_ref in CONFIG_MAPPING:
        config = CONFIG_MAPPING[model_ref]()
    else:
        raise SystemExit(f"sloth doctor: {model_ref!r} is neither a local model folder nor a transformers "
                         f"model_type (e.g. llama, qwen2, gemma2)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return str(patch(model, SlothConfig(**options)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sloth", description="sloth_plugins command line")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="print machine capabilities and, for a model, the patch report")
    doctor.add_argument("model", nargs="?", help="local model folder (config.json) or a model_type such as llama")
    doctor.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="SlothConfig option for the report, e.g. --set gradient_checkpointing=recompute")
    args = parser.parse_args(argv)
    print(machine_report())
    if args.model:
        options = {}
        for item in args.set:
            key, _, value = item.partition("=")
            options[key] = {"true": True, "false": False}.get(value.lower(), value)
        print()
        print(model_report(args.model, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
