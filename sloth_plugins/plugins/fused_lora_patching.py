"""Wires the fused LoRA autograd paths (kernels/lora.py) into model instances.

Engages per module only when it is exactly equivalent to PEFT (see fused_lora.*_support); the
fused forwards re-check on every call and fall back to the module's own forward when an
adapter was disabled or merged after patching.
"""
from __future__ import annotations

from typing import MutableMapping, Optional

import torch

from ..instance_patch import InstancePatcher, has_instance_override
from ..report import PatchReport
from ..state import Stash, StashKey
from . import fused_lora, zero3
from ._modules import get_path

_ZERO3_QKV = "(under DeepSpeed ZeRO-3: one fused LoRA linear per projection)"
EXTRACTION_CACHE = StashKey[MutableMapping]()   # the model's fused_lora.extract_lora cache


def lora_cache(stash: Stash):
    """The patched model's extraction cache (created on first use)."""
    cache = stash.get(EXTRACTION_CACHE, None)
    if cache is None:
        cache = stash[EXTRACTION_CACHE] = fused_lora.new_cache()
    return cache


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _hooked(module, names) -> bool:
    """Whether a layer a fused path would call around (not through ``__call__``) has hooks we
    cannot honour: PEFT's ``adapter_names`` pre-hooks (mixed-adapter batches), DeepSpeed's
    parameter gathering, a user's. Dict truthiness only: this runs on every call."""
    modules = module._modules
    return any(getattr(modules[n], h) for n in names for h in _HOOKS)


def _zero3_ready(owner, modules, entry) -> bool:
    """Under DeepSpeed ZeRO-3, the weights of ``modules`` gathered for ``owner``'s forward and backward
    (``zero3.gather_for``); False, with the report's line revised, when the fused path must not run."""
    params = zero3.partitioned_params(*modules)
    if any(type(p).__name__ == "Params4bit" for p in params):
        reason = ("bitsandbytes 4-bit base weights under DeepSpeed ZeRO-3 are not verified with the fused path: "
                  "the module's own forward runs")
    else:
        try:
            zero3.gather_for(owner, params)
            return True
        except zero3.NotGathered as e:
            reason = f"{e}: the module's own forward runs"
    if entry is not None and entry.patched:
        entry.patched, entry.detail = False, reason
    return False


def _fusable_hooks(module, names) -> bool:
    """No hook on the projections that a fused path (which does not call them) would skip; under
    DeepSpeed ZeRO-3 its own gathering hooks are replaced by ``_zero3_ready`` on ``module``."""
    return not _hooked(module, names) or (zero3.under_zero3(module) and zero3.only_zero3_hooks(module, names))


def _has_lora(*modules) -> bool:
    return any(fused_lora._is_lora_layer(m) for m in modules if m is not None)


def try_patch_lora_mlp(mlp, path: str, kind, arch, report: PatchReport, patcher: InstancePatcher,
                       cache=None) -> bool:
    """True when the whole gated MLP now runs through one fused LoRA autograd function."""
    gate_name, up_name, down_name = arch.mlp_projections()
    names = fused_lora.mlp_projection_names(gate_name, up_name, down_name)
    if not _has_lora(*(get_path(mlp, n) for n in names)):
        return False
    if kind is None:
        report.fallback("lora_mlp", "activation has no fused gated kernel", path)
        return False
    ok, reason = fused_lora.mlp_support(mlp, gate_name=gate_name, up_name=up_name, down_name=down_name)
    if not ok or has_instance_override(mlp):
        report.fallback("lora_mlp", reason if not ok else "forward already replaced by another library", path)
        return False
    original = mlp.forward
    entry = report.patched("lora_mlp", path, f"fused LoRA {kind}")

    def forward(self, x):
        if not _fusable_hooks(self, names):
            return original(x)
        if zero3.under_zero3(self) and not _zero3_ready(self, [self._modules[n] for n in names], entry):
            return original(x)
        try:
            return fused_lora.fused_mlp_forward(self, x, kind, gate_name=gate_name, up_name=up_name,
                                                down_name=down_name, cache=cache)
        except fused_lora.UnsupportedLoraLayer:
            return original(x)

    patcher.bind(mlp, "forward", forward, wraps=original)
    return True


def patch_lora_projections(attn, path: str, arch, config, report: PatchReport, patcher: InstancePatcher,
                           cache=None) -> None:
    separate_qkv = arch.q_proj and arch.k_proj and arch.v_proj
    fused_qkv = bool(separate_qkv and config.kernel_enabled("lora_qkv")
                     and _try_patch_qkv_together(attn, path, (arch.q_proj, arch.k_proj, arch.v_proj), report, patcher,
                                                 cache))
    groups = [] if fused_qkv else [("lora_qkv", n) for n in (arch.q_proj, arch.k_proj, arch.v_proj, arch.qkv_proj) if n]
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
        entry = report.patched(kind, f"{path}.{name}", "fused LoRA linear")
        _bind_fused_linear(layer, patcher, cache=cache, entry=entry)


def _try_patch_qkv_together(attn, path: str, names: tuple, report: PatchReport, patcher: InstancePatcher,
                            cache=None) -> bool:
    """q, k and v in one autograd function (one saved x, one dx, one down-projection matmul).

    The attention forward is the model's own: around it, q, k and v of its ``hidden_states`` are
    computed together and handed to the three projections when they are called with that very
    tensor (unchanged since); any other call computes its projection alone. Returns False, with
    nothing patched, when the three cannot go together; they are then patched one by one."""
    layers = [get_path(attn, n) for n in names]
    if not _has_lora(*layers) or fused_lora.qkv_support(attn, *names) != (True, ""):
        return False
    if any(has_instance_override(layer) for layer in layers):
        return False
    if has_instance_override(attn) and not patcher.owns(attn, "forward"):   # ours: the RoPE patch
        return False
    ready = {}   # projection name -> (hidden_states, its version, that projection's output)
    together = f"fused LoRA {'/'.join(names)} in one autograd function"
    entry = report.patched("lora_qkv", path, together)
    for name, layer in zip(names, layers):
        _bind_fused_linear(layer, patcher, ready, name, cache, entry)
    original = attn.forward

    def forward(self, *args, **kwargs):
        if zero3.under_zero3(self):
            # DeepSpeed's pre-forward hook hands each projection a new tensor for its input, so the
            # precomputed outputs could not be matched to the calls: each projection fuses alone.
            if entry.detail == together:
                entry.detail = f"{together} {_ZERO3_QKV}"
            return original(*args, **kwargs)
        x = args[0] if args else kwargs.get("hidden_states")
        if ready or not isinstance(x, torch.Tensor) or x.is_inference() or _hooked(self, names):
            return original(*args, **kwargs)                # (no version counter on an inference tensor)
        try:
            outs = fused_lora.fused_qkv_forward(self, x, *names, cache=cache)
        except fused_lora.UnsupportedLoraLayer:
            return original(*args, **kwargs)
        version = x._version
        ready.update((name, (x, version, out)) for name, out in zip(names, outs))
        try:
            return original(*args, **kwargs)
        finally:
            ready.clear()

    patcher.bind(attn, "forward", forward, wraps=original)
    return True


def _bind_fused_linear(layer, patcher: InstancePatcher, ready: Optional[dict] = None, name: str = "",
                       cache=None, entry=None) -> None:
    original = layer.forward

    def forward(self, x, *args, **kwargs):
        if ready:
            hit = ready.pop(name, None)
            if hit is not None and hit[0] is x and hit[1] == x._version and not (args or kwargs):
                return hit[2]
        if args or kwargs:          # e.g. adapter_names= for mixed-adapter batches: PEFT's own path
            return original(x, *args, **kwargs)
        if zero3.under_zero3(self) and not _zero3_ready(self, [self], entry):
            return original(x)
        try:
            return fused_lora.fused_linear_forward(self, x, cache)
        except fused_lora.UnsupportedLoraLayer:
            return original(x)

    patcher.bind(layer, "forward", forward, wraps=original)
