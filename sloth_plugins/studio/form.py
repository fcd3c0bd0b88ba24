"""The UI's flat fields <-> a run config (no Gradio here, so it is testable on its own).

Every field is named ``section.key`` (``training.max_steps``, ``sloth.loss``, ``lora.r``,
``mapping.instruction``); SlothConfig values typed as text (kernels, loss_chunk_size,
memory_budget_gb) are parsed as ``sloth doctor --set`` parses them (``config.Option.parse``).
"""
from __future__ import annotations

from typing import Any, Dict, List

from ..config import SlothConfig, option
from .config import LORA, TRAINING, check_run_config
from .datasets import FORMATS

MAPPING_FIELDS = sorted({field for fields in FORMATS.values() for field in fields})
SLOTH_TEXT_KEYS = ("kernels", "loss_chunk_size", "memory_budget_gb")   # typed as text in the UI


def field_names() -> List[str]:
    names = ["name", "model", "method", "mapping.format"] + [f"mapping.{f}" for f in MAPPING_FIELDS]
    names += [f"lora.{k}" for k in LORA] + [f"sloth.{k}" for k in SlothConfig().to_dict()]
    names += [f"training.{k}" for k in TRAINING]
    return names


def _int_if_whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def fields_to_config(fields: Dict[str, Any]) -> Dict[str, Any]:
    """A checked run config from the form's values (ValueError names the bad field)."""
    fmt = fields["mapping.format"]
    mapping = {"format": fmt}
    for field in FORMATS.get(fmt, ()):
        mapping[field] = fields.get(f"mapping.{field}") or None
    sloth = {}
    for key in SlothConfig().to_dict():
        value = fields[f"sloth.{key}"]
        if key in SLOTH_TEXT_KEYS:
            value = option(key).parse(str(value)) if str(value if value is not None else "").strip() else None
        sloth[key] = value
    lora = {k: _int_if_whole(fields[f"lora.{k}"]) for k in LORA}
    lora["dropout"] = float(lora["dropout"])
    targets = str(fields["lora.target_modules"]).strip()
    lora["target_modules"] = (targets if targets == "all-linear"
                              else [t.strip() for t in targets.split(",") if t.strip()])
    training = {}
    for key, (default, _) in TRAINING.items():
        value = fields[f"training.{key}"]
        if key == "report_to":
            value = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value or [])
        elif isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int):
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        training[key] = value
    return check_run_config({"name": fields.get("name") or "", "model": (fields.get("model") or "").strip(),
                             "method": fields["method"], "dataset": {"file": "", "mapping": mapping},
                             "lora": lora, "sloth": sloth, "training": training})


def config_to_fields(config: Dict[str, Any]) -> Dict[str, Any]:
    """The form's values for ``config`` (e.g. to show a past run's settings)."""
    config = check_run_config(config) if config.get("model") else config
    fields: Dict[str, Any] = {"name": config.get("name", ""), "model": config.get("model", ""),
                              "method": config["method"], "mapping.format": config["dataset"]["mapping"]["format"]}
    for field in MAPPING_FIELDS:
        fields[f"mapping.{field}"] = config["dataset"]["mapping"].get(field) or ""
    for k, v in config["lora"].items():
        fields[f"lora.{k}"] = ",".join(v) if isinstance(v, list) else v
    for k, v in config["sloth"].items():
        if k in SLOTH_TEXT_KEYS:
            v = "" if v is None else (",".join(v) if isinstance(v, (list, tuple)) else str(v).lower()
                                      if isinstance(v, bool) else str(v))
        fields[f"sloth.{k}"] = v
    for k, v in config["training"].items():
        fields[f"training.{k}"] = ",".join(v) if k == "report_to" else v
    return fields
