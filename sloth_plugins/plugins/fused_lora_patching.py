"""Wires the fused LoRA autograd paths (kernels/lora.py) into model instances.

Engages per module only when it is exactly equivalent to PEFT (see fused_lora.*_support); the
fused forwards re-check on every call and fall back to the module's own forward when an
adapter was disabled or merged after patching.
"""
from __future__ import annotations

from ..instance_patch import InstancePatcher, has_instance_override
from ..report import PatchReport
from . import fused_lora
from ._modules import get_path


def _has_lora(*modules) -> bool:
    return any(fused_lora._is_lora_layer(m) for m in modules if m is not None)


def try_patch_lora_mlp(mlp, path: str, kind, arch, report: PatchReport, patcher: InstancePatcher) -> bool:
    """True when the whole gated MLP now runs through one fused LoRA autograd function."""
    gate_name = arch.gate_up_proj or arch.gate_proj
    up_name = None if arch.gate_up_proj else arch.up_proj
    names = [n for n in (gate_name, up_name, arch.down_proj) if n]
    if not _has_lora(*(get_path(mlp, n) for n in names)):
        return False
    if kind is None:
        report.fallback("lora_mlp", "activation has no fused gated kernel", path)
        return False
    ok, reason = fused_lora.mlp_support(mlp, gate_name=gate_name, up_name=up_name, down_name=arch.down_proj)
    if not ok or has_instance_override(mlp):
        report.fallback("lora_mlp", reason if not ok else "forward already replaced by another library", path)
        return False
    original = mlp.forward

    def forward(self, x):
        try:
            return fused_lora.fused_mlp_forward(self, x, kind, gate_name=gate_name, up_name=up_name,
                                                down_name=arch.down_proj)
        except fused_lora.UnsupportedLoraLayer:
            return original(x)

    patcher.bind(mlp, "forward", forward, wraps=original)
    report.patched("lora_mlp", path, f"fused LoRA {kind}")
    return True


def patch_lora_projections(attn, path: str, arch, config, report: PatchReport, patcher: InstancePatcher) -> None:
    groups = [("lora_qkv", n) for n in (arch.q_proj, arch.k_proj, arch.v_proj, arch.qkv_proj) if n]
    groups.append(("lora_o", arch.o_proj))
    for kind, name in groups:
        layer = get_path(attn, name)
        if not config.kernel_enabled(kind) or layer is None or not fused_lora._is_lora_layer(layer):
            continue
        ok, reason = fused_lora.lora_layer_support(layer)
        if not ok or has_instance_override(layer):
            report.fallback(kind, reason if not ok else "forward already replaced by another library",
                            f"{path}.{name}")
            continue
        _bind_fused_linear(layer, patcher)
        report.patched(kind, f"{path}.{name}", "fused LoRA linear")


def _bind_fused_linear(layer, patcher: InstancePatcher) -> None:
    original = layer.forward

    def forward(self, x, *args, **kwargs):
        if args or kwargs:          # e.g. adapter_names= for mixed-adapter batches: PEFT's own path
            return original(x, *args, **kwargs)
        try:
            return fused_lora.fused_linear_forward(self, x)
        except fused_lora.UnsupportedLoraLayer:
            return original(x)

    patcher.bind(layer, "forward", forward, wraps=original)
