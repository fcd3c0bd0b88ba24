"""SlothConfig: the one typed configuration every adapter maps its own settings onto."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from .kernels.names import KERNEL_NAMES  # defined once, beside the kernels

LOSS_MODES = ("chunked", "off")
CHECKPOINTING_MODES = ("auto", "offload", "recompute", "off")
ATTENTION_MODES = ("auto", "sloth", "sdpa")
# Other names of a key: transformers 5 calls gradient checkpointing "activation checkpointing".
ALIASES = {"activation_checkpointing": "gradient_checkpointing"}


@dataclass(frozen=True)
class Option:
    """One SlothConfig key: its kind of value and what it means. ``OPTIONS`` below is the one
    definition every front end reads: SlothConfig's validation, ``sloth doctor --set`` (types
    from the kind), the Axolotl ``sloth_*`` pydantic args (annotations and descriptions).

    kind: "kernels" (see SlothConfig), "choice" (one of ``choices``), "bool", "positive_int" or
    "positive_number" (both also None: ``nullable``)."""
    name: str
    kind: str
    help: str
    choices: Tuple[str, ...] = ()

    @property
    def nullable(self) -> bool:
        return self.kind in ("kernels", "positive_int", "positive_number")

    def check(self, value: Any) -> None:
        """SlothConfigError naming the key when ``value`` is not one this option takes."""
        if self.kind == "kernels":
            _parse_kernels(value)
        elif self.kind == "choice":
            if value not in self.choices:
                raise SlothConfigError(f"{self.name} must be one of {', '.join(self.choices)}; got {value!r}")
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise SlothConfigError(f"{self.name} must be true or false, got {value!r}")
        elif value is not None:
            ok = (not isinstance(value, bool) and isinstance(value, (int, float))
                  and math.isfinite(value) and value > 0)
            if self.kind == "positive_int" and not (ok and isinstance(value, int)):
                raise SlothConfigError(f"{self.name} must be a positive int or None, got {value!r}")
            if not ok:
                raise SlothConfigError(f"{self.name} must be a positive number or None, got {value!r}")

    def parse(self, text: str) -> Any:
        """The value of ``text`` as typed on a command line (``--set name=text``), by this option's kind."""
        text = text.strip()
        low = text.lower()
        if self.nullable and low in ("none", "null", ""):
            return None
        if self.kind == "bool" or (self.kind == "kernels" and low in ("true", "false")):
            if low not in ("true", "false"):
                raise SlothConfigError(f"{self.name} takes true or false, got {text!r}")
            return low == "true"
        if self.kind == "kernels":
            return [item.strip() for item in text.split(",") if item.strip()]
        if self.kind in ("positive_int", "positive_number"):
            cast = int if self.kind == "positive_int" else float
            try:
                return cast(text)
            except ValueError:
                what = "a whole number" if cast is int else "a number"
                raise SlothConfigError(f"{self.name} takes {what} (or none), got {text!r}") from None
        return text


OPTIONS: Tuple[Option, ...] = (
    Option("kernels", "kernels", f"Triton kernels: true (all), false (none), a list of {', '.join(KERNEL_NAMES)}, "
                                 f"or a map of name: true/false applied to all on"),
    Option("loss", "choice", "chunked: the causal-LM loss from the final hidden states in token chunks, never the "
                             "full logits; off: the model's own loss", LOSS_MODES),
    Option("loss_chunk_size", "positive_int", "tokens per loss chunk; none sizes chunks from free memory"),
    Option("return_logits", "bool", "also return full logits in training (costs the memory the chunked loss saves)"),
    Option("gradient_checkpointing", "choice", "auto (measure the first step, then keep / recompute / offload each "
                                               "layer within the budget) | offload | recompute | off",
           CHECKPOINTING_MODES),
    Option("memory_budget_gb", "positive_number", "device memory the auto plan may fill; none means 90% of the "
                                                  "device"),
    Option("strict", "bool", "raise instead of falling back when something cannot be patched"),
    Option("attention", "choice", "auto | sloth (the varlen kernel for packed batches) | sdpa (leave the model's "
                                  "attention alone)", ATTENTION_MODES),
    Option("padding_free", "bool", "train padded batches as one packed row of the real tokens (same loss, no "
                                   "padding compute)"),
)
OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


def option(name: str) -> Option:
    """The Option of a key (an alias gives its key's); SlothConfigError naming the valid keys otherwise."""
    name = ALIASES.get(name, name)
    if name not in OPTIONS_BY_NAME:
        raise SlothConfigError(f"unknown SlothConfig key {name!r}; valid keys: {', '.join(OPTIONS_BY_NAME)}")
    return OPTIONS_BY_NAME[name]


class SlothConfigError(ValueError):
    """A configuration value or key that sloth_plugins does not accept."""


class SlothUnsupported(RuntimeError):
    """A piece of the model cannot be patched (raised instead of falling back under ``strict=True``)."""


@dataclass(frozen=True)
class SlothConfig:
    """What to patch and how.

    kernels: True (all), False (none), an iterable of names from KERNEL_NAMES (only those), or a
        dict of name -> True/False that switches those kernels on or off, starting from all on
        (``{"rms_norm": False}`` is every kernel but rms_norm).
    loss: "chunked" computes the causal-LM loss from the final hidden states in token chunks,
        never materialising the [tokens x vocab] logits; "off" leaves the model's loss alone.
    loss_chunk_size: tokens per chunk; None sizes chunks from free memory.
    return_logits: also return full logits in training (costs the memory the loss saves).
    gradient_checkpointing: "auto" | "offload" | "recompute" | "off" (see README); also accepted as
        ``activation_checkpointing`` (transformers 5's name), see ``ALIASES``.
    memory_budget_gb: device memory the "auto" plan may fill; None means 90% of the device.
    strict: raise instead of falling back when something cannot be patched.
    attention: "auto" keeps the model's attention except for packed batches (several samples per
        row) on CUDA where a one-time measurement finds sloth's varlen kernel faster; "sloth" sends
        every call it can to the kernel (torch reference off CUDA); "sdpa" leaves the model's
        attention (SDPA / FlashAttention through transformers) alone.
    padding_free: train without padding. In a training forward with a 2-D right-padding mask
        the decoder runs its layers on one packed row of the real tokens (position ids restarting
        at 0 per sample, ``cu_seq_lens``) and hands the head the hidden states in the padded
        layout again: same loss and logits shape, labels untouched. Families of the architecture
        table only (others fall back). Left-padded batches and batches a collator already packed
        (``integrations.collators.PaddingFreeCollator``, TRL's ``padding_free``, Axolotl's
        ``sample_packing``) pass through. The HF callback turns it on for TRL's padding-free
        SFTConfig; Axolotl's plugin follows ``sample_packing``.
    """

    kernels: Any = True
    loss: str = "chunked"
    loss_chunk_size: Optional[int] = None
    return_logits: bool = False
    gradient_checkpointing: str = "auto"
    memory_budget_gb: Optional[float] = None
    strict: bool = False
    attention: str = "auto"
    padding_free: bool = False
    enabled_kernels: Tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __init__(self, **options: Any) -> None:
        options = _resolve_aliases(options)
        valid = [f.name for f in dataclasses.fields(self) if f.init]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise SlothConfigError(
                f"unknown SlothConfig key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(valid)}")
        for f in dataclasses.fields(self):
            if f.init:
                object.__setattr__(self, f.name, options.get(f.name, f.default))
        self._validate()

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]] = None) -> "SlothConfig":
        return cls(**dict(options or {}))

    @classmethod
    def resolve(cls, config: Any = None, where: str = "config", **options: Any) -> "SlothConfig":
        """The one way every entry point (``patch``, the adapters) turns what a user passed into a
        SlothConfig: a SlothConfig, a dict of its keys (as read from YAML or JSON) or None, with
        keyword ``options`` overriding. Anything else is a TypeError that says what to pass."""
        if isinstance(config, Mapping):
            config = cls.from_dict(config)
        elif config is not None and not isinstance(config, SlothConfig):
            raise TypeError(f"{where}: config must be a SlothConfig(...) (or a dict of its keys), or leave it out "
                            f"and pass keyword options, e.g. gradient_checkpointing='recompute'; got "
                            f"{type(config).__name__} {repr(config)[:80]}")
        if config is None:
            return cls(**options)
        return config.replace(**options) if options else config

    def replace(self, **changes: Any) -> "SlothConfig":
        return SlothConfig(**{**self.to_dict(), **_resolve_aliases(changes)})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def kernel_enabled(self, name: str) -> bool:
        return name in self.enabled_kernels

    def _validate(self) -> None:
        for opt in OPTIONS:
            opt.check(getattr(self, opt.name))
        object.__setattr__(self, "enabled_kernels", _parse_kernels(self.kernels))


def _resolve_aliases(options: Mapping[str, Any]) -> dict:
    """``options`` with each alias under its key's name; an alias and its key both given must agree."""
    out = dict(options)
    for alias, key in ALIASES.items():
        if alias in out:
            value = out.pop(alias)
            if key in out and out[key] != value:
                raise SlothConfigError(f"{alias}={value!r} and {key}={out[key]!r} name the same option "
                                       f"({alias} is an alias of {key}): give one")
            out[key] = value
    return out


def _choice(key: str, value: Any, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise SlothConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _parse_kernels(value: Any) -> Tuple[str, ...]:
    if value is True:
        return KERNEL_NAMES
    if value is False or value is None:
        return ()
    if isinstance(value, Mapping):
        _check_kernel_names(value)
        for name, on in value.items():
            if not isinstance(on, bool):
                raise SlothConfigError(f"kernels[{name!r}] must be true or false, got {on!r}")
        return tuple(n for n in KERNEL_NAMES if value.get(n, True))
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        names = tuple(value)
    except TypeError:
        raise SlothConfigError(f"kernels must be true, false, a list of {', '.join(KERNEL_NAMES)} or a dict of "
                               f"name: true/false; got {value!r}") from None
    _check_kernel_names(names)
    return names


def _check_kernel_names(names) -> None:
    bad = [n for n in names if n not in KERNEL_NAMES]
    if bad:
        raise SlothConfigError(f"unknown kernel name(s) {', '.join(map(repr, bad))}; valid: {', '.join(KERNEL_NAMES)}")
