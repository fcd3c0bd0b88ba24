"""Model families as data: where the pieces live and which flavour each one has.

The kernel plugin reads these entries; adding a family is adding an entry (here, or from a
third-party plugin through the ``sloth_architectures`` hook). Paths are relative to one
decoder layer unless noted.

Vision-language models are entries too: their language model's paths (``layers``, ``final_norm``)
point inside the composite model, ``decoder`` names the module whose forward takes every input
(pixel values included) and returns the final hidden states, and ``vision`` lists the vision
tower's layer stacks, themselves entries (no attention patched; norms and MLPs where listed). One
model_type may name several classes (``mllama``: the text-only CausalLM and the vision model), so
an entry may be restricted to ``classes``.
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
    attention: Optional[str] = "self_attn"
    q_proj: Optional[str] = "q_proj"
    k_proj: Optional[str] = "k_proj"
    v_proj: Optional[str] = "v_proj"
    qkv_proj: Optional[str] = None               # fused projection (Phi-3)
    o_proj: Optional[str] = "o_proj"
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
    #   (whether the installed release returns router logits at all is read from its model class, not
    #   stated here: plugins/router_outputs.py)
    # ---- vision-language models (issue 19) ----
    classes: Tuple[str, ...] = ()                # model classes this entry describes; () = every class of its types
    decoder: Optional[str] = None                # from the CausalLM: module returning the final hidden states
                                                 # from all inputs (the loss runs it); None: base_model_prefix
    config_attr: Optional[str] = None            # model.config attribute holding this stack's config
                                                 # (vision stacks: "vision_config"); None: the text config
    vision: Tuple["Architecture", ...] = ()      # the vision tower's layer stacks (paths from the CausalLM)

    def stack_config(self, config):
        """The config this stack's layers read: ``config.<config_attr>``, else the text config."""
        if self.config_attr:
            return getattr(config, self.config_attr, None)
        getter = getattr(config, "get_text_config", None)
        return getter() if callable(getter) else config

    def stacks(self) -> Tuple["Architecture", ...]:
        """Every layer stack of the model in the order a forward runs them: vision towers, then the
        language model (the checkpoint controller relies on that order)."""
        return self.vision + (self,)

    def activation(self, config) -> Optional[str]:
        config = self.stack_config(config)
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
        value = getattr(self.stack_config(config), self.logit_softcap_attr, None)
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
    # GLM-4.5 / 4.6 (DeepSeek-V3-style routing: sigmoid scores + correction bias, grouped top-k, the router
    # stays transformers' own): a shared expert per MoE block, the first ``first_k_dense_replace`` layers
    # dense gated MLPs, half-rotary RoPE, q/k norms when ``use_qk_norm``; no load-balancing loss in its forward.
    Architecture("glm4_moe", ("glm4_moe",), qk_norm=("q_norm", "k_norm"), partial_rotary=True, experts="experts",
                 shared_experts=("shared_experts",)),
)


# ---- vision-language models (issue 19) ------------------------------------------------------------
def _vision(name: str, layers: str, norms: Tuple[str, ...], mlp_projections: Tuple[Optional[str], ...],
            activation_attr: str = "hidden_act") -> Architecture:
    """A vision tower's layer stack: checkpointed; RMSNorms and gated MLPs patched where they are ones
    (LayerNorms and fc1 -> act -> fc2 MLPs are reported as fallbacks); its attention is left alone."""
    gate, up, down = mlp_projections
    return Architecture(name, (), layers=layers, final_norm="", lm_head="", norms=norms, attention=None,
                        q_proj=None, k_proj=None, v_proj=None, o_proj=None, gate_proj=gate, up_proj=up,
                        down_proj=down, activation_attr=activation_attr, config_attr="vision_config")


_VL_TEXT = dict(layers="model.language_model.layers", final_norm="model.language_model.norm", decoder="model")
_SIGLIP = _vision("siglip vision", "model.vision_tower.encoder.layers", ("layer_norm1", "layer_norm2"),
                  (None, None, "fc2"))
_QWEN_VL_VISION = _vision("qwen2.5-vl vision", "model.visual.blocks", ("norm1", "norm2"),
                          ("gate_proj", "up_proj", "down_proj"))
_QWEN3_VL_VISION = _vision("qwen3-vl vision", "model.visual.blocks", ("norm1", "norm2"),
                           (None, None, "linear_fc2"))
_MLLAMA_VISION = (_vision("mllama vision", "model.vision_model.transformer.layers",
                          ("input_layernorm", "post_attention_layernorm"), (None, None, "fc2")),
                  _vision("mllama global vision", "model.vision_model.global_transformer.layers",
                          ("input_layernorm", "post_attention_layernorm"), (None, None, "fc2")))
_LLAMA4_VISION = _vision("llama4 vision", "vision_model.model.layers", ("input_layernorm", "post_attention_layernorm"),
                         (None, None, "fc2"))

VISION_LANGUAGE_ARCHITECTURES: Tuple[Architecture, ...] = (
    # Gemma3ForConditionalGeneration does not softcap its logits (Gemma3ForCausalLM does)
    Architecture("gemma3 vision-language", ("gemma3",), classes=("Gemma3ForConditionalGeneration",),
                 norms=_GEMMA2_LAYER_NORMS, qk_norm=("q_norm", "k_norm"), activation_attr="hidden_activation",
                 vision=(_SIGLIP,), **_VL_TEXT, **_GEMMA_NORMS),
    Architecture("qwen2.5-vl", ("qwen2_5_vl",), classes=("Qwen2_5_VLForConditionalGeneration",),
                 vision=(_QWEN_VL_VISION,), **_VL_TEXT),
    Architecture("qwen3-vl", ("qwen3_vl",), classes=("Qwen3VLForConditionalGeneration",),
                 qk_norm=("q_norm", "k_norm"), vision=(_QWEN3_VL_VISION,), **_VL_TEXT),
    Architecture("mllama", ("mllama",), classes=("MllamaForConditionalGeneration",), vision=_MLLAMA_VISION,
                 **_VL_TEXT),
    # what AutoModelForCausalLM builds from a Llama-3.2-Vision checkpoint: its language model alone
    Architecture("mllama text", ("mllama",), classes=("MllamaForCausalLM",), decoder="model"),
    # Llama 4: its language model is a CausalLM of its own inside the composite model (the head runs
    # there), so the loss keeps the model's own; MoE feed-forwards are not gated MLPs (reported).
    Architecture("llama4 vision-language", ("llama4",), classes=("Llama4ForConditionalGeneration",),
                 layers="language_model.model.layers", final_norm="language_model.model.norm",
                 lm_head="language_model.lm_head", mlp="feed_forward", vision=(_LLAMA4_VISION,)),
)
BUILTIN_ARCHITECTURES = BUILTIN_ARCHITECTURES + VISION_LANGUAGE_ARCHITECTURES


@dataclass
class ArchitectureTable:
    by_model_type: Dict[str, Architecture] = field(default_factory=dict)
    by_class: Dict[Tuple[str, str], Architecture] = field(default_factory=dict)

    def add(self, arch: Architecture) -> None:
        for model_type in arch.model_types:
            if arch.classes:
                for cls in arch.classes:
                    self.by_class[(model_type, cls)] = arch
            else:
                self.by_model_type[model_type] = arch

    def lookup(self, model_type: str, class_name: Optional[str] = None) -> Optional[Architecture]:
        """The entry for this model class, else the one for its model_type (every class)."""
        return self.by_class.get((model_type, class_name)) or self.by_model_type.get(model_type)

    def model_types(self) -> Tuple[str, ...]:
        return tuple(sorted(set(self.by_model_type) | {t for t, _ in self.by_class}))
