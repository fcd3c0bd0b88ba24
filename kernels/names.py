"""The names the kernels answer to, defined once: everything else derives its tables from here.

No torch import: ``sloth_plugins.config`` reads ``KERNEL_NAMES`` from this module, and the core
(architecture table, fused-LoRA glue) reads ``GATED_ACTIVATIONS``.

* ``KERNEL_NAMES``: what ``SlothConfig(kernels=[...])`` accepts.
* ``SWITCHED_KERNELS``: the kernels with a Triton-or-torch switch, the environment variable
  ``SLOTH_KERNEL_<NAME>`` (``kernel_env_var``). ``SLOTH_KERNEL_GATED_ACT``, the old name of
  ``SLOTH_KERNEL_MLP``, still works (``DEPRECATED_ENV_VARS``) and warns once.
* ``GATED_ACTIVATIONS``: the gated MLP activations ``act(gate) * up``, by kernel name.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

KERNEL_NAMES: Tuple[str, ...] = ("rms_norm", "rope", "mlp", "lora_mlp", "lora_qkv", "lora_o", "moe_experts")
SWITCHED_KERNELS: Tuple[str, ...] = ("rms_norm", "rope", "mlp")
DEPRECATED_ENV_VARS: Dict[str, str] = {"mlp": "SLOTH_KERNEL_GATED_ACT"}   # kernel name -> old variable


def kernel_env_var(name: str) -> str:
    """``SLOTH_KERNEL_<NAME>`` for a name of ``SWITCHED_KERNELS``."""
    return f"SLOTH_KERNEL_{name.upper()}"


class GatedActivation(NamedTuple):
    """One gated activation ``act(gate) * up``.

    ``act``: the gate's activation, as the Triton kernels and the references name it (``silu``,
    ``gelu``, ``gelu_tanh``); ``kind_id``: its ``KIND`` constant in the Triton kernels;
    ``gelu_approximate``: ``F.gelu``'s ``approximate`` for the GeGLUs, None for SwiGLU;
    ``hidden_acts``: the ``hidden_act`` / ``hidden_activation`` values of Hugging Face configs
    that mean this activation."""
    act: str
    kind_id: int
    gelu_approximate: Optional[str]
    hidden_acts: Tuple[str, ...]


GATED_ACTIVATIONS: Dict[str, GatedActivation] = {
    "swiglu": GatedActivation("silu", 0, None, ("silu", "swish")),
    "geglu": GatedActivation("gelu", 1, "none", ("gelu",)),
    "geglu_tanh": GatedActivation("gelu_tanh", 2, "tanh", ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")),
}
GATED_ACTIVATION_NAMES: Tuple[str, ...] = tuple(GATED_ACTIVATIONS)
# hidden_act / hidden_activation values -> gated-activation kernel names
HIDDEN_ACT_TO_GATED: Dict[str, str] = {
    hidden: name for name, spec in GATED_ACTIVATIONS.items() for hidden in spec.hidden_acts}
# the gate activation's name -> its KIND constant in the Triton kernels
ACT_KIND_IDS: Dict[str, int] = {spec.act: spec.kind_id for spec in GATED_ACTIVATIONS.values()}


def gated_activation_spec(kind: str) -> GatedActivation:
    """The entry for ``kind``; ValueError naming the valid ones otherwise."""
    spec = GATED_ACTIVATIONS.get(kind)
    if spec is None:
        raise ValueError(f"unknown gated activation {kind!r}; expected one of {GATED_ACTIVATION_NAMES}")
    return spec
