"""Model families as data: where the pieces live and which flavour each one has.

The kernel plugin reads these entries; adding a family is adding an entry (here, or from a
third-party plugin through the ``sloth_architectures`` hook). Paths are relative to one
decoder layer unless noted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from .kernels.names import HIDDEN_ACT_TO_GATED

# hidden_act / hidden_activation values -> our gated-activation kernel names (kernels/names.py)
ACTIVATIONS = HIDDEN_ACT_TO_GATED


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: Tuple[str, ...]
    layers: str = "model.layers"                 # from the CausalLM
    final_norm: str = "model.norm"               # from the CausalLM
    lm_head: str = "lm_head"                     # from the CausalLM
    norms: Tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    attention: str = "self_attn"
    q_proj: Optional[str] = "q_proj"
    k_proj: Optional[str] = "k_proj"
    v_proj: Optional[str] = "v_proj"
    qkv_proj: Optional[str] = None               # fused projection (Phi-3)
    o_proj: str = "o_proj"
    qk_norm: Tuple[str, ...] = ()                # per-head norms inside attention (Qwen3, Gemma3)
    mlp: str = "mlp"
    gate_proj: Optional[str] = "gate_proj"
    up_proj: Optional[str] = "up_proj"
    gate_up_proj: Optional[str] = None           # fused [gate; up] projection (Phi-3)
    down_proj: str = "down_proj"
    activation_attr: str = "hidden_act"          # config attribute naming the MLP activation
    norm_offset: float = 0.0                     # Gemma family scales by (1 + w)
    norm_cast_before_weight: bool = True         # Llama casts to the input dtype before * w
    logit_softcap_attr: Optional[str] = None     # config attribute holding the final logit softcap
    partial_rotary: bool = False
    # Mixture of experts (None / () on dense families). A layer's ``mlp`` holding ``experts`` is a
    # sparse MoE block; one without it (Qwen-MoE's ``mlp_only_layers``) is a dense gated MLP.
    experts: Optional[str] = None                # transformers' experts module (3-D expert weights) in the block
    shared_experts: Tuple[str, ...] = ()         # dense gated MLPs beside the routed experts in the block
    router_aux_loss: Optional[str] = None        # function of the CausalLM's module the model adds to its loss:
    #   router_aux_loss_coef * f(router_logits, num_experts, num_experts_per_tok, attention_mask)

    def activation(self, config) -> Optional[str]:
        value = getattr(config, self.activation_attr, None)
        if value is None and self.activation_attr != "hidden_act":
            value = getattr(config, "hidden_act", None)
        return ACTIVATIONS.get(value) if isinstance(value, str) else None

    def mlp_projections(self) -> Tuple[Optional[str], Optional[str], str]:
        """(gate, up, down) projection names of the MLP. ``up`` is None when the family fuses gate
        and up into one projection (``gate_up_proj``, Phi-3): ``gate`` then names that projection,
        whose output halves are [gate | up]. The one place that decides fused vs separate."""
        if self.gate_up_proj:
            return self.gate_up_proj, None, self.down_proj
        return self.gate_proj, self.up_proj, self.down_proj

    def logit_softcap(self, config) -> Optional[float]:
        if self.logit_softcap_attr is None:
            return None
        value = getattr(config, self.logit_softcap_attr, None)
        return float(value) if value else None


_GEMMA_NORMS = dict(norm_offset=1.0, norm_cast_before_weight=False)
_GEMMA2_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm",
                       "pre_feedforward_layernorm", "post_feedforward_layernorm")

BUILTIN_ARCHITECTURES: Tuple[Architecture, ...] = (
    Architecture("llama", ("llama",)),
    Architecture("mistral", ("mistral",)),
    Architecture("qwen2", ("qwen2",)),
    Architecture("qwen3", ("qwen3",), qk_norm=("q_norm", "k_norm")),
    Architecture("gemma", ("gemma",), activation_attr="hidden_activation", **_GEMMA_NORMS),
    Architecture("gemma2", ("gemma2",), norms=_GEMMA2_LAYER_NORMS, activation_attr="hidden_activation",
                 logit_softcap_attr="final_logit_softcapping", **_GEMMA_NORMS),
    Architecture("gemma3", ("gemma3_text",), norms=_GEMMA2_LAYER_NORMS, qk_norm=("q_norm", "k_norm"),
                 activation_attr="hidden_activation", logit_softcap_attr="final_logit_softcapping",
                 **_GEMMA_NORMS),
    Architecture("phi3", ("phi3",), q_proj=None, k_proj=None, v_proj=None, qkv_proj="qkv_proj",
                 gate_proj=None, up_proj=None, gate_up_proj="gate_up_proj", partial_rotary=True),
    # Mixture-of-experts families (issue 19)
    Architecture("mixtral", ("mixtral",), experts="experts", router_aux_loss="load_balancing_loss_func"),
    Architecture("qwen3_moe", ("qwen3_moe",), qk_norm=("q_norm", "k_norm"), experts="experts",
                 router_aux_loss="load_balancing_loss_func"),
    Architecture("qwen2_moe", ("qwen2_moe",), experts="experts", shared_experts=("shared_expert",),
                 router_aux_loss="load_balancing_loss_func"),
)


@dataclass
class ArchitectureTable:
    by_model_type: Dict[str, Architecture] = field(default_factory=dict)

    def add(self, arch: Architecture) -> None:
        for model_type in arch.model_types:
            self.by_model_type[model_type] = arch

    def lookup(self, model_type: str) -> Optional[Architecture]:
        return self.by_model_type.get(model_type)

    def model_types(self) -> Tuple[str, ...]:
        return tuple(sorted(self.by_model_type))
