"""Built-in plugin: swap RMSNorm, rotary application and the gated MLP for our kernels.

Each module keeps its parameters; only its ``forward`` (bound to that instance) changes, and
the new forward calls into ``sloth_plugins.kernels``, which picks Triton on CUDA and the
torch reference elsewhere.
"""
from __future__ import annotations

import inspect
import sys
from typing import Optional

import torch

from ..architectures import Architecture
from ..hookspecs import hookimpl
from ..instance_patch import InstancePatcher, has_instance_override
from ..kernels import apply_rope, gated_activation, rms_norm
from ..report import PatchReport
from ._modules import decoder_layers, get_path, rebind_global
from .fused_lora_patching import lora_cache, patch_lora_projections, try_patch_lora_mlp
from .moe_patching import moe_block_parts, patch_experts

_ROPE_PARAMS = ["q", "k", "cos", "sin", "unsqueeze_dim"]


class KernelPlugin:
    @hookimpl
    def sloth_patch_model(self, model, config, report: PatchReport, arch: Optional[Architecture],
                          patcher: InstancePatcher, context):
        if arch is None or not config.enabled_kernels:
            return
        cache = lora_cache(context.stash)
        for stack in arch.stacks():
            _patch_stack(model, stack, config, report, patcher, cache)
        if config.kernel_enabled("rms_norm"):
            _patch_norm(get_path(model, arch.final_norm), arch.final_norm, arch, report, patcher)


def _patch_stack(model, arch: Architecture, config, report: PatchReport, patcher: InstancePatcher, cache) -> None:
    """The layers of one stack: the language model's decoder layers, or a vision tower's."""
    layers = get_path(model, arch.layers)
    if layers is None:
        report.fallback("layers", f"no layer stack at {arch.layers} ({arch.name}): nothing of it is patched")
        return
    if arch.attention is None:
        report.note(f"{arch.name} ({arch.layers}): attention and its rotary embedding keep the model's own code "
                    f"(the table knows no kernel for them)")
    for layer_path, layer in decoder_layers(model, arch.layers):
        if config.kernel_enabled("rms_norm"):
            for name in arch.norms:
                _patch_norm(get_path(layer, name), f"{layer_path}.{name}", arch, report, patcher)
        attn = get_path(layer, arch.attention)
        if config.kernel_enabled("rms_norm"):
            for name in arch.qk_norm:
                _patch_norm(get_path(attn, name), f"{layer_path}.{arch.attention}.{name}", arch, report, patcher)
        if config.kernel_enabled("rope") and attn is not None:
            _patch_rope(attn, f"{layer_path}.{arch.attention}", report, patcher)
        if attn is not None and (config.kernel_enabled("lora_qkv") or config.kernel_enabled("lora_o")):
            patch_lora_projections(attn, f"{layer_path}.{arch.attention}", arch, config, report, patcher, cache)
        mlp = get_path(layer, arch.mlp)
        experts, shared = moe_block_parts(arch, mlp) if mlp is not None else (None, ())
        if experts is None and mlp is not None:
            _patch_mlp(mlp, f"{layer_path}.{arch.mlp}", model.config, arch, config, report, patcher, cache)
        elif experts is not None:
            block = f"{layer_path}.{arch.mlp}"
            for name, module in shared:
                _patch_mlp(module, f"{block}.{name}", model.config, arch, config, report, patcher, cache)
            if config.kernel_enabled("moe_experts"):
                patch_experts(experts, f"{block}.{arch.experts}", arch.activation(model.config), report, patcher)


def _norm_eps(module) -> Optional[float]:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _patch_norm(module, path: str, arch: Architecture, report: PatchReport, patcher: InstancePatcher) -> None:
    if module is None:
        return
    if "rmsnorm" not in type(module).__name__.lower() or getattr(module, "bias", None) is not None:
        report.fallback("rms_norm", f"{type(module).__name__} is not an RMSNorm", path)
        return
    weight = getattr(module, "weight", None)
    eps = _norm_eps(module)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or eps is None:
        report.fallback("rms_norm", f"{type(module).__name__} has no 1-D weight and float eps", path)
        return
    if getattr(module, "with_scale", True) is False:
        report.fallback("rms_norm", "norm without scale", path)
        return
    if has_instance_override(module):
        report.fallback("rms_norm", "forward already replaced on this instance by another library", path)
        return
    offset, cast_first = arch.norm_offset, arch.norm_cast_before_weight

    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, eps, offset, cast_first)

    patcher.bind(module, "forward", forward, wraps=module.forward)
    report.patched("rms_norm", path, f"rms_norm(offset={offset:g})")


def _sloth_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    return apply_rope(q, k, cos, sin, unsqueeze_dim)


def _sloth_apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    """Multimodal RoPE (Qwen2.5-VL in transformers < 5.2x): ``cos``/``sin`` hold one table per position
    axis (temporal, height, width: ``[3, batch, seq, dim]``); channel section ``i`` of [sections; sections]
    takes axis ``i % 3``. Selecting the sections is exact (no arithmetic); the rotation is ours."""
    sections = list(mrope_section) * 2
    cos = torch.cat([part[i % 3] for i, part in enumerate(cos.split(sections, dim=-1))], dim=-1)
    sin = torch.cat([part[i % 3] for i, part in enumerate(sin.split(sections, dim=-1))], dim=-1)
    return apply_rope(q, k, cos, sin, unsqueeze_dim)


# The rotary functions a transformers attention module may call, the signature we know for each, our
# replacement and the report's detail. The first the module's file defines and its forward calls wins.
_ROPE_FORMS = (
    ("apply_rotary_pos_emb", _ROPE_PARAMS, _sloth_apply_rotary_pos_emb, "apply_rope(q, k)"),
    ("apply_multimodal_rotary_pos_emb", ["q", "k", "cos", "sin", "mrope_section", "unsqueeze_dim"],
     _sloth_apply_multimodal_rotary_pos_emb, "apply_rope(q, k) on the multimodal (mrope) sections"),
)


def _patch_rope(attn, path: str, report: PatchReport, patcher: InstancePatcher) -> None:
    cls_forward = type(attn).forward
    modeling = sys.modules.get(type(attn).__module__)
    forms = [(name, getattr(modeling, name), *rest) for name, *rest in _ROPE_FORMS
             if getattr(modeling, name, None) is not None]
    if not forms:
        report.fallback("rope", f"{type(attn).__module__} has no apply_rotary_pos_emb", path)
        return
    if has_instance_override(attn):
        report.fallback("rope", "attention forward already replaced on this instance by another library", path)
        return
    why = []
    for name, original, known, replacement, detail in forms:
        # Hugging Face's `kernels` package (installed with axolotl) turns the function into a module
        target = original.forward if isinstance(original, torch.nn.Module) else inspect.unwrap(original)
        params = list(inspect.signature(target).parameters)
        if params != known:
            why.append(f"{name}{tuple(params)} is not the rotate-half signature we know")
            continue
        rebuilt = _rebuilt_attention_forward(cls_forward, name, original, replacement)
        if rebuilt is None:
            why.append(f"attention forward does not call {name} where we can reach it")
            continue
        patcher.set(attn, "forward", rebuilt.__get__(attn))
        report.patched("rope", path, detail)
        return
    report.fallback("rope", "; ".join(why), path)


_REBUILT = {}


def _rebuilt_attention_forward(cls_forward, name, original, replacement):
    key = (cls_forward, original)
    if key not in _REBUILT:
        _REBUILT[key] = rebind_global(cls_forward, name, original, replacement)
    return _REBUILT[key]


def _patch_mlp(mlp, path: str, model_config, arch: Architecture, config, report: PatchReport,
               patcher: InstancePatcher, cache=None) -> None:
    gate, up, down = arch.mlp_projections()
    if gate is None:
        if config.kernel_enabled("mlp") or config.kernel_enabled("lora_mlp"):
            report.fallback("mlp", f"{type(mlp).__name__} is not a gated MLP (up -> activation -> {down}): "
                                   f"no fused kernel for it", path)
        return
    kind = arch.activation(model_config)
    if config.kernel_enabled("lora_mlp") and try_patch_lora_mlp(mlp, path, kind, arch, report, patcher, cache):
        return
    if not config.kernel_enabled("mlp"):
        return
    if kind is None:
        act = getattr(arch.stack_config(model_config), arch.activation_attr, None)
        report.fallback("mlp", f"activation {act!r} has no fused gated kernel", path)
        return
    if has_instance_override(mlp):
        report.fallback("mlp", "forward already replaced on this instance by another library", path)
        return
    # Projections are looked up on every call: PEFT may wrap them after we patch.
    names = (gate, down) if up is None else (gate, up, down)
    if any(get_path(mlp, n) is None for n in names):
        report.fallback("mlp", f"{type(mlp).__name__} has no {'/'.join(map(str, names))} (not a gated MLP: e.g. a "
                                f"mixture of experts)", path)
        return
    if up is None:   # one fused gate_up projection
        gate_up = gate

        def forward(self, x):
            g, u = getattr(self, gate_up)(x).chunk(2, dim=-1)
            return getattr(self, down)(gated_activation(kind, g, u))
    else:
        def forward(self, x):
            return getattr(self, down)(gated_activation(kind, getattr(self, gate)(x), getattr(self, up)(x)))

    patcher.bind(mlp, "forward", forward, wraps=mlp.forward)
    report.patched("mlp", path, kind)
