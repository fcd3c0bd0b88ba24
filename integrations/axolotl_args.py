"""The Axolotl config keys of ``SlothPlugin`` and the checks that keep two patches off one module.

Axolotl merges this pydantic model into its own config model (``get_input_args``), so the
validators below see the whole config: they reject bad ``sloth_*`` values, unknown
``sloth_*`` keys (Axolotl drops unknown keys silently) and every option that would patch a
module sloth also patches, naming the key to change.

``sloth_padding_free`` follows ``sample_packing`` when unset. Axolotl 0.19 packs for in-tree
models without patching them: its multipack batches carry position ids restarting per sample,
and for a packing-capable attention (sdpa, eager, flash / flex ...) it drops the attention mask,
so transformers (and sloth's attention, which hands the calls it does not take back to the
implementation Axolotl chose, its ``sdpa_varlen`` wrapper included) keep the samples apart from
the position ids. Its ``_get_unpad_data`` multipack patch only touches remote-code models. With
an attention that does not decontaminate packing (``attn_implementation`` unset), Axolotl keeps
its mask of sample indices, which transformers reads as one sample per row; sloth's padding-free
forward splits it into its samples instead. The one combination refused: padded (unpacked)
batches under context parallelism, which splits rows across ranks before the model's forward.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Union

from pydantic import Field, create_model, field_validator, model_validator

from ..config import KERNEL_NAMES, OPTIONS, Option, SlothConfig, SlothConfigError

PREFIX = "sloth_"
CONFIG_FIELDS = tuple(o.name for o in OPTIONS)
CONFIG_KEYS = tuple(PREFIX + name for name in CONFIG_FIELDS)
# Per-kernel booleans, as Axolotl's Liger plugin has them (liger_rope, liger_rms_norm, ...):
# sloth_rms_norm: false is sloth_kernels: {rms_norm: false}.
KERNEL_KEYS = tuple(PREFIX + name for name in KERNEL_NAMES)
KEYS = CONFIG_KEYS + KERNEL_KEYS

# Which sloth kernels patch the modules each Axolotl LoRA kernel option patches.
LORA_KERNEL_OWNERS = {
    "lora_mlp_kernel": ("mlp", "lora_mlp"),          # replaces layer.mlp.forward
    "lora_qkv_kernel": ("rope", "lora_qkv", "lora_o"),  # rewrites the attention class forward
    "lora_o_kernel": ("rope", "lora_qkv", "lora_o"),
}


_PYTHON_TYPES = {"bool": bool, "positive_int": int, "positive_number": float}


def _annotation(opt: Option):
    """The pydantic type of an Option's Axolotl key, from its kind (the values are checked by
    ``Option.check``, the config's own validation, not restated here)."""
    if opt.kind == "kernels":
        return Union[bool, Dict[str, bool], List[str], str, None]
    if opt.kind == "choice":
        return Optional[Literal[opt.choices]]
    return Optional[_PYTHON_TYPES[opt.kind]]


_FIELDS: Dict[str, Any] = {PREFIX + o.name: (_annotation(o), Field(default=None, description=o.help)) for o in OPTIONS}
_FIELDS.update({key: (Optional[bool], Field(default=None, description=f"the {name} kernel on/off: with "
                                                                      f"sloth_kernels true/false/unset it overrides "
                                                                      f"that default; with a list it must agree"))
                for key, name in zip(KERNEL_KEYS, KERNEL_NAMES)})
_SlothFields = create_model("_SlothFields", **_FIELDS)


class SlothArgs(_SlothFields):
    """``sloth_*`` keys of an Axolotl config (``plugins: [sloth_plugins.integrations.axolotl.SlothPlugin]``):
    one per SlothConfig option (``config.OPTIONS``) and one boolean per kernel."""

    @model_validator(mode="before")
    @classmethod
    def check_unknown_sloth_keys(cls, data):
        if isinstance(data, dict):
            unknown = sorted(k for k in data if isinstance(k, str) and k.startswith(PREFIX) and k not in KEYS)
            if unknown:
                raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                                 f"(SlothPlugin); valid keys: {', '.join(KEYS)}")
        return data

    @field_validator(*(PREFIX + o.name for o in OPTIONS if o.kind == "choice" and "off" in o.choices), mode="before")
    @classmethod
    def false_is_off(cls, value):
        # YAML reads an unquoted ``off`` (as the README and the conflict messages write it) as false
        return "off" if value is False else value

    @field_validator(*CONFIG_KEYS)
    @classmethod
    def check_value(cls, value, info):
        if value is not None:
            try:
                OPTIONS[CONFIG_KEYS.index(info.field_name)].check(value)
            except SlothConfigError as exc:
                raise ValueError(f"{info.field_name}: {exc}") from None
        return value

    @model_validator(mode="after")
    def check_conflicts(self):
        problems = conflicts(lambda key: getattr(self, key, None), sloth_config_from(self))
        if problems:
            raise ValueError("SlothPlugin and other options would patch the same modules:\n- " + "\n- ".join(problems))
        return self


def _getter(cfg: Any) -> Callable[[str], Any]:
    return (lambda key: cfg.get(key)) if isinstance(cfg, Mapping) else (lambda key: getattr(cfg, key, None))


def kernels_option(cfg: Any) -> Any:
    """The SlothConfig ``kernels`` value of an Axolotl config: ``sloth_kernels`` with the per-kernel
    booleans. ``sloth_kernels`` true / false / unset is the default of each kernel whose boolean is
    unset (``sloth_kernels: false`` + ``sloth_rms_norm: true`` is RMSNorm alone); a list or map
    names kernels itself, and a boolean that contradicts it is refused (two answers to one question)."""
    get = _getter(cfg)
    value = get(PREFIX + "kernels")
    switches = {name: get(key) for key, name in zip(KERNEL_KEYS, KERNEL_NAMES) if get(key) is not None}
    if not switches:
        return value
    bad = [k for k, v in switches.items() if not isinstance(v, bool)]
    if bad:
        raise ValueError(f"SlothPlugin: {', '.join(PREFIX + k for k in bad)} must be true or false")
    if value is None or isinstance(value, bool):
        default = value is not False
        return [name for name in KERNEL_NAMES if switches.get(name, default)]
    try:
        enabled = set(SlothConfig(kernels=value).enabled_kernels)
    except SlothConfigError as exc:
        raise ValueError(f"SlothPlugin: sloth_kernels: {exc}") from None
    contradictions = [f"{PREFIX}{k}: {str(on).lower()}" for k, on in switches.items() if on != (k in enabled)]
    if contradictions:
        raise ValueError(f"SlothPlugin: {', '.join(contradictions)} contradict{'s' if len(contradictions) == 1 else ''}"
                         f" sloth_kernels: {value!r}: give each kernel's choice once (sloth_kernels as a list, or "
                         f"sloth_kernels: true/false with per-kernel booleans)")
    return value


def sloth_config_from(cfg: Any) -> SlothConfig:
    """The SlothConfig of an Axolotl config (a validated DictDefault or the merged pydantic model)."""
    get = _getter(cfg)
    options = {}
    for name in CONFIG_FIELDS:
        value = get(PREFIX + name)
        if value is not None:
            options[name] = value
    kernels = kernels_option(cfg)
    if kernels is not None:
        options["kernels"] = kernels
    if "padding_free" not in options and _truthy(get("sample_packing")):
        options["padding_free"] = True   # Axolotl's batches are packed: say so, and read them as packed
    try:
        return SlothConfig(**options)
    except SlothConfigError as exc:
        raise ValueError(f"SlothPlugin: {exc}") from None


def _truthy(value) -> bool:
    return bool(value) and value != "false"


def _sub(value: Any, key: str):
    if value is None:
        return None
    return value.get(key) if isinstance(value, dict) else getattr(value, key, None)


def conflicts(get: Callable[[str], Any], config: SlothConfig) -> List[str]:
    """Every option set in the config that patches a module ``config`` patches too, as a fix-it line."""
    out: List[str] = []
    kernels = set(config.enabled_kernels)

    def clash(key: str, ours: str, fix_ours: str, what: str) -> None:
        out.append(f"{key}: {get(key)!r} and {ours} both {what}: set {key}: false, or {fix_ours}")

    def kernel_clash(key: str, names, what: str) -> None:
        mine = sorted(kernels & set(names))
        if mine and _truthy(get(key)):
            rest = sorted(kernels - set(names))
            fix = f"set sloth_kernels: [{', '.join(rest)}]" if rest else "set sloth_kernels: false"
            clash(key, f"sloth_kernels ({', '.join(mine)})", fix, what)

    for key, owners in LORA_KERNEL_OWNERS.items():
        kernel_clash(key, owners, "patch the " + ("MLP" if key == "lora_mlp_kernel" else "attention") + " forward")
    kernel_clash("liger_rms_norm", ("rms_norm",), "replace RMSNorm")
    kernel_clash("liger_rope", ("rope",), "replace rotary embeddings")
    kernel_clash("liger_glu_activation", ("mlp", "lora_mlp"), "replace the gated MLP")
    kernel_clash("liger_swiglu", ("mlp", "lora_mlp"), "replace the gated MLP")
    kernel_clash("tiled_mlp", ("mlp", "lora_mlp"), "replace the MLP forward")
    kernel_clash("flash_attn_fuse_mlp", ("mlp", "lora_mlp"), "replace the MLP")
    kernel_clash("fused_attn_kernel", ("rope", "lora_qkv", "lora_o"), "patch the attention forward")
    kernel_clash("use_kernels", ("rms_norm", "mlp", "lora_mlp"), "swap in kernels for RMSNorm / MLP")

    if config.loss != "off":
        for key, what in (("cut_cross_entropy", "Cut Cross Entropy plugin"),
                          ("liger_fused_linear_cross_entropy", "Liger fused linear CE"),
                          ("liger_cross_entropy", "Liger cross-entropy"),
                          ("chunked_cross_entropy", "Axolotl's chunked cross-entropy"),
                          ("flash_attn_cross_entropy", "flash-attn cross-entropy")):
            if _truthy(get(key)):
                clash(key, f"sloth_loss: {config.loss}", "set sloth_loss: off",
                      f"compute the causal-LM loss ({what})")

    cp = get("context_parallel_size")
    if config.padding_free and isinstance(cp, int) and cp > 1 and not _truthy(get("sample_packing")):
        out.append(f"sloth_padding_free: true and context_parallel_size: {cp}: Axolotl splits each padded row across "
                   f"the ranks before the model's forward, and packing the pieces would mix the ranks' samples: set "
                   f"sloth_padding_free: false, or sample_packing: true (its rows are packed before the split)")

    mode = config.gradient_checkpointing
    if mode != "off":
        ours = f"sloth_gradient_checkpointing: {mode}"
        offloading, gc = get("activation_offloading"), get("gradient_checkpointing")
        if _truthy(offloading) or gc in ("offload", "offload_disk"):
            # Axolotl turns gradient_checkpointing: offload into activation_offloading: true
            keys = " / ".join(f"{k}: {v!r}" for k, v in (("activation_offloading", offloading),
                                                         ("gradient_checkpointing", gc))
                              if v in ("offload", "offload_disk") or (k == "activation_offloading" and _truthy(v)))
            out.append(f"{keys} and {ours} both manage the decoder layers' activations: set activation_offloading: "
                       f"false and gradient_checkpointing: true (sloth then owns recompute; "
                       f"sloth_gradient_checkpointing: offload parks layer inputs in host memory), or set "
                       f"sloth_gradient_checkpointing: off")
        if _truthy(get("selective_checkpointing")):
            clash("selective_checkpointing", ours, "set sloth_gradient_checkpointing: off",
                  "set the decoder layers' checkpoint function")
        fsdp_ac = _sub(get("fsdp_config"), "activation_checkpointing")
        if _truthy(fsdp_ac) and mode in ("recompute", "offload"):
            out.append(f"fsdp_config.activation_checkpointing: true and {ours} would checkpoint every layer twice: "
                       f"set fsdp_config.activation_checkpointing: false, or sloth_gradient_checkpointing: off "
                       f"(or auto)")
    return out
