"""Wires the grouped-GEMM experts (``kernels/moe.py``) into transformers' own experts modules.

Only where the math is known: the module is the family's experts class from transformers
(``@use_experts_implementation``) with [gate; up] concatenated 3-D weights ``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``, not transposed, no bias, no post-expert norm,
the default gating ``act(gate) * up`` with an activation we have a kernel for, and no expert
parallelism. Anything else keeps the model's own experts forward, reported.

The router, the block around the experts and the model's load-balancing loss are untouched: the
patched forward takes the routing the block computed. The forward re-checks on every call and
runs the model's own ``experts_implementation`` when something changed since patching (expert
parallelism set up, weights swapped for another kind of tensor), under ``torch.compile``, and on CUDA
where the Triton path does not take the tensors (fp32 expert weights). Off CUDA the torch reference runs.
PEFT's ``target_parameters`` LoRA on the expert weights (``ParamWrapper``): where its adapters are
laid out per expert (``[E, out, in]`` deltas, one active adapter, no bias / DoRA) the outermost
wrapper's forward runs the grouped GEMMs with the adapters' factors as rank-r grouped GEMMs beside
them (W + s·B·A is never formed, the frozen base gets no weight gradient); otherwise PEFT's
parametrization runs and the patched experts forward reads ``self.gate_up_proj`` = W + s·B·A.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch

from ..architectures import Architecture
from ..instance_patch import InstancePatcher, has_instance_override
from ..kernels import use_triton
from ..kernels.moe import ExpertLora, moe_experts, supported, supported_weights
from ..report import PatchReport

KIND = "moe_experts"
_LAYOUT = (("has_gate", True), ("has_bias", False), ("is_transposed", False), ("is_concatenated", True),
           ("has_post_expert_norm", False), ("_is_expert_parallel", False))
_ABSENT_MEANS_NO = ("has_post_expert_norm", "_is_expert_parallel")   # transformers 5.16 predates them
_MISSING = object()


def _base_layer(module):
    """The experts module under PEFT's ParamWrapper(s) (``target_parameters``), or itself."""
    seen = 0
    while hasattr(module, "base_layer") and type(module).__module__.startswith("peft.") and seen < 8:
        module, seen = module.base_layer, seen + 1
    return module


def _default_gate(cls) -> bool:
    moe = sys.modules.get("transformers.integrations.moe")
    default = getattr(moe, "_default_apply_gate", None)
    return default is not None and getattr(cls, "_apply_gate", None) is default


def experts_support(experts, kind: Optional[str]) -> Tuple[bool, str]:
    cls = type(experts)
    if not cls.__module__.startswith("transformers.models.") or not cls.__name__.endswith("Experts"):
        return False, f"{cls.__module__}.{cls.__name__} is not a transformers experts class"
    for attr, want in _LAYOUT:
        value = getattr(experts, attr, _MISSING)
        if value is _MISSING and attr in _ABSENT_MEANS_NO:
            continue
        if value is not want:
            shown = "missing" if value is _MISSING else repr(value)
            return False, f"{cls.__name__}.{attr} is {shown} (the grouped GEMM takes {want})"
    if not _default_gate(cls):
        return False, f"{cls.__name__} has its own gating (_apply_gate), not act(gate) * up"
    if kind is None:
        return False, "activation has no fused gated kernel"
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor) or gu.dim() != 3 or down.dim() != 3:
        return False, "gate_up_proj / down_proj are not 3-D tensors"
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2):
        return False, f"expert weights {tuple(gu.shape)} / {tuple(down.shape)} are not [E, 2I, H] / [E, H, I]"
    if e != getattr(experts, "num_experts", None):
        return False, f"{cls.__name__}.num_experts does not match its {e} expert weights"
    if not (gu.is_floating_point() and type(gu) in (torch.nn.Parameter, torch.Tensor)):
        return False, f"expert weights are {type(gu).__name__} of {gu.dtype} (quantised?): the model's experts run"
    return True, ""


def _still_supported(self, hidden_states, top_k_index) -> bool:
    gu = self.gate_up_proj      # under PEFT's parametrization: W + scale·B·A, a plain tensor
    return (not torch.compiler.is_compiling() and not getattr(self, "_is_expert_parallel", False)
            and hidden_states.dim() == 2
            and type(gu) in (torch.nn.Parameter, torch.Tensor) and gu.is_floating_point()
            and top_k_index.dim() == 2)


def patch_experts(experts, path: str, kind: Optional[str], report: PatchReport, patcher: InstancePatcher) -> None:
    base = _base_layer(experts)
    ok, reason = experts_support(base, kind)
    if ok and has_instance_override(base):
        ok, reason = False, "forward already replaced on this instance by another library"
    if not ok:
        report.fallback(KIND, reason, path)
        return
    if base.gate_up_proj.is_cuda and supported_weights(base.gate_up_proj) is not None:
        report.fallback(KIND, f"{supported_weights(base.gate_up_proj)}: transformers' experts_implementation runs",
                        path)
        return
    original = base.forward
    e = base.gate_up_proj.shape[0]
    implementation = getattr(getattr(base, "config", None), "_experts_implementation", None)
    entry = report.patched(KIND, path, f"grouped GEMM {kind}, {e} experts (replaces experts_implementation="
                                       f"{implementation!r})")
    wrappers = _param_wrappers(experts)
    if wrappers:
        why = _lora_support(wrappers, base)
        if why is None:
            _bind_fused_lora(wrappers, base, kind, patcher, entry)
            entry.detail += f"; LoRA on {'/'.join(w.parameter_name for w in wrappers)} fused (rank-r grouped GEMMs)"
        else:
            entry.detail += f"; LoRA on the expert weights through PEFT's parametrization (not fused: {why})"

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if not _still_supported(self, hidden_states, top_k_index):
            return original(hidden_states, top_k_index, top_k_weights)
        if hidden_states.is_cuda:
            why = ("SLOTH_DISABLE_TRITON=1 or Triton unusable" if not use_triton(hidden_states) else
                   supported(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj))
            if why is not None:      # e.g. weights cast to fp32 after patching: transformers' own, and say so
                if entry.patched:
                    entry.patched, entry.detail = False, f"a CUDA call ran transformers' experts: {why}"
                return original(hidden_states, top_k_index, top_k_weights)
        return moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, kind)

    patcher.bind(base, "forward", forward, wraps=original)


def _param_wrappers(module) -> list:
    """PEFT's ``target_parameters`` wrappers around the experts module, outermost first."""
    out = []
    while type(module).__name__ == "ParamWrapper" and type(module).__module__.startswith("peft."):
        out.append(module)
        module = module.base_layer
    return out


def _lora_support(wrappers, base) -> Optional[str]:
    if has_instance_override(wrappers[0]):
        return "the adapter wrapper's forward was already replaced by another library"
    names = [getattr(w, "parameter_name", None) for w in wrappers]
    if len(set(names)) != len(names) or not set(names) <= {"gate_up_proj", "down_proj"}:
        return f"LoRA on parameters {names}"
    for w in wrappers:
        if getattr(w, "_did_swap_in_out_features", None) is not True or w.num_experts != base.num_experts:
            return f"{w.parameter_name}'s adapters are not laid out per expert as [E, out, in]"
        if any(getattr(w, "lora_bias", {}).values()) or any(getattr(w, "use_dora", {}).values()):
            return "lora_bias / DoRA"
    return None


def _factors(wrapper, num_experts):
    """(ExpertLora or None, fusable) for the wrapper's state now."""
    if wrapper.disable_adapters or wrapper.merged:
        return None, False
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not active:
        return None, True
    if len(active) != 1:
        return None, False
    name = active[0]
    A, B = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
    r = A.shape[0] // num_experts
    return ExpertLora(A.reshape(num_experts, r, A.shape[1]), B.reshape(B.shape[0], r, num_experts).permute(2, 0, 1),
                      float(wrapper.scaling[name])), True


def _bind_fused_lora(wrappers, base, kind, patcher: InstancePatcher, entry) -> None:
    """The outermost wrapper runs the experts with the adapters' factors (no parametrization); any state
    the fused path does not take (disabled / merged adapters, several active, mixed-batch arguments,
    another parametrization) runs PEFT's own forward."""
    outer = wrappers[0]
    original = outer.forward

    def forward(self, x, *args, **kwargs):
        if kwargs or len(args) != 2 or hasattr(base, "parametrizations"):
            return original(x, *args, **kwargs)
        top_k_index, top_k_weights = args
        loras = {}
        for w in wrappers:
            lora, ok = _factors(w, base.num_experts)
            if not ok:
                return original(x, *args, **kwargs)
            loras[w.parameter_name] = lora
        if not _still_supported(base, x, top_k_index):
            return original(x, *args, **kwargs)
        if x.is_cuda and (not use_triton(x) or supported(x, top_k_index, top_k_weights, base.gate_up_proj,
                                                          base.down_proj) is not None):
            return original(x, *args, **kwargs)
        return moe_experts(x, top_k_index, top_k_weights, base.gate_up_proj, base.down_proj, kind,
                           lora_gate_up=loras.get("gate_up_proj"), lora_down=loras.get("down_proj"))

    patcher.bind(outer, "forward", forward, wraps=original)


def moe_block_parts(arch: Architecture, mlp) -> Tuple[Optional[object], Tuple[Tuple[str, object], ...]]:
    """(experts module, ((name, shared-expert MLP), ...)) of a layer's MLP when it is a MoE block."""
    from ._modules import get_path
    experts = get_path(mlp, arch.experts)
    if experts is None:
        return None, ()
    return experts, tuple((n, m) for n in arch.shared_experts if (m := get_path(mlp, n)) is not None)
