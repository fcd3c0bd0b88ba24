"""PEFT LoRA layers -> the fused LoRA kernels (``sloth_plugins.kernels.lora``).

Plain functions; the kernel plugin decides where to use them. A layer is fused only when the
fused math is exactly PEFT's: one active adapter, no dropout, no DoRA or other variant, no
LoRA bias, a plain ``nn.Linear`` or bitsandbytes ``Linear4bit`` base, nothing merged or
disabled. The checks are cheap and dynamic state can change (``with model.disable_adapter():``
in TRL, ``merge_adapter()``, ``set_adapter``), so the ``fused_*_forward`` functions re-check on
every call and raise :class:`UnsupportedLoraLayer` (with the one-line reason) for the caller to
fall back to the module's own forward.

Dtypes (per projection, like PEFT): without autocast the base matmul runs in the base weight's
dtype (bnb: ``compute_dtype``), the LoRA branch in the adapter's dtype, the output is PEFT's
(``x`` dtype for bnb). Under autocast both run in the autocast dtype; the adapter weights are
cast (differentiably) so their gradients still arrive in their own dtype.
Known rounding-level difference: for a bnb base with fp32 adapters and bf16 activations (no
autocast) PEFT rounds the LoRA term to bf16 before adding it; we add in fp32 and round once.

peft and bitsandbytes are imported lazily; bitsandbytes only when a layer comes from it.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..kernels.lora import LoraProjection, lora_gated_mlp, lora_projections
from ..kernels.names import gated_activation_spec
from ..kernels.nf4 import QuantState4bit


class UnsupportedLoraLayer(ValueError):
    """Raised by the fused forwards when a layer cannot be fused right now; str() is the reason."""


# ----------------------------------------------------------------------------- type checks

@functools.lru_cache(maxsize=None)
def _peft_classes():
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return None, None
    return LoraLayer, LoraLinear


@functools.lru_cache(maxsize=None)
def _peft_bnb_linear4bit():
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def _comes_from(obj, package: str) -> bool:
    return type(obj).__module__.split(".")[0] == package


def _is_bnb_linear4bit(module) -> bool:
    if not _comes_from(module, "bitsandbytes"):
        return False
    import bitsandbytes as bnb
    return isinstance(module, bnb.nn.Linear4bit)


def _is_lora_layer(module) -> bool:
    LoraLayer, _ = _peft_classes()
    return LoraLayer is not None and isinstance(module, LoraLayer)


def _is_fusable_lora_type(layer) -> bool:
    _, LoraLinear = _peft_classes()
    if LoraLinear is not None and type(layer) is LoraLinear:
        return True
    return type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer) is _peft_bnb_linear4bit()


# ----------------------------------------------------------------------------- support

def _base_support(base) -> tuple[bool, str]:
    if _is_bnb_linear4bit(base):
        qs = _bnb_quant_state(base)
        if qs is None:
            return False, "bnb Linear4bit weight is not quantized"
        if getattr(qs, "packing_format_for_cpu", False):
            return False, "bnb Linear4bit weight is in the CPU inference packing format"
        if qs.quant_type not in ("nf4", "fp4") or len(qs.shape) != 2:
            return False, f"bnb quant_type {qs.quant_type!r} with shape {tuple(qs.shape)}"
        return True, ""
    if type(base) is not nn.Linear:
        return False, f"base layer {type(base).__name__} is not nn.Linear or bnb Linear4bit"
    if base.weight.requires_grad:
        return False, "base weight is trainable"
    return True, ""


def lora_layer_support(layer) -> tuple[bool, str]:
    """(True, "") when ``layer``'s forward equals the fused math; else (False, one-line reason)."""
    if not _is_lora_layer(layer):
        return False, f"{type(layer).__name__} is not a PEFT LoRA layer"
    if not _is_fusable_lora_type(layer):
        return False, f"LoRA layer type {type(layer).__module__}.{type(layer).__name__} is not fused"
    if layer.disable_adapters:
        return False, "adapters are disabled"
    if layer.merged:
        return False, "adapter is merged into the base weight"
    active = list(layer.active_adapters)
    if len(active) != 1:
        return False, f"{len(active)} active adapters"
    name = active[0]
    if name not in layer.lora_A:
        return False, f"active adapter {name!r} has no LoRA weights on this layer"
    if layer.use_dora.get(name, False):
        return False, "DoRA"
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        return False, f"LoRA variant {type(variant).__name__}"
    if layer.lora_bias.get(name, False):
        return False, "lora_bias"
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, nn.Identity):
        p = getattr(dropout, "p", None)
        if p is None or p > 0:
            return False, f"lora_dropout={p} > 0"
    if getattr(layer, "fan_in_fan_out", False):
        return False, "fan_in_fan_out"
    if not getattr(layer, "cast_input_dtype_enabled", True):
        return False, "PEFT input dtype casting is disabled"
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None \
            or lora_B.bias is not None:
        return False, "LoRA A/B are not bias-free nn.Linear"
    if lora_A.weight.dtype != lora_B.weight.dtype:
        return False, f"LoRA A is {lora_A.weight.dtype}, B is {lora_B.weight.dtype}"
    return _base_support(layer.get_base_layer())


def projection_support(module) -> tuple[bool, str]:
    """A supported LoRA layer, or a plain frozen nn.Linear / bnb Linear4bit (fused without LoRA)."""
    if _is_lora_layer(module):
        return lora_layer_support(module)
    return _base_support(module)


def _group_support(modules: dict) -> tuple[bool, str]:
    missing = [name for name, m in modules.items() if m is None]
    if missing:
        return False, f"no {', '.join(missing)}"
    for name, module in modules.items():
        ok, reason = projection_support(module)
        if not ok:
            return False, f"{name}: {reason}"
    kinds = {_is_bnb_linear4bit(_base_layer(m)) for m in modules.values()}
    lora_dtypes = {m.lora_A[m.active_adapters[0]].weight.dtype for m in modules.values() if _is_lora_layer(m)}
    if len(lora_dtypes) > 1:
        return False, f"LoRA dtypes differ: {sorted(map(str, lora_dtypes))}"
    if len(kinds) > 1:
        return False, "mix of 4-bit and dense base weights"
    return True, ""


def qkv_support(attn, q_name: str = "q_proj", k_name: str = "k_proj", v_name: str = "v_proj") -> tuple[bool, str]:
    return _group_support({n: getattr(attn, n, None) for n in (q_name, k_name, v_name)})


def mlp_projection_names(gate_name: str, up_name: Optional[str], down_name: str) -> list:
    """The MLP's projections in call order; ``up_name=None``: ``gate_name`` is a fused gate_up
    projection (see ``Architecture.mlp_projections``)."""
    return [gate_name] + ([up_name] if up_name else []) + [down_name]


def mlp_support(mlp, gate_name: str = "gate_proj", up_name: Optional[str] = "up_proj",
                down_name: str = "down_proj") -> tuple[bool, str]:
    names = mlp_projection_names(gate_name, up_name, down_name)
    return _group_support({n: getattr(mlp, n, None) for n in names})


# ----------------------------------------------------------------------------- extraction

def _base_layer(module):
    return module.get_base_layer() if _is_lora_layer(module) else module


def _bnb_quant_state(base):
    qs = getattr(base.weight, "quant_state", None)
    return qs if qs is not None else getattr(base, "quant_state", None)


@dataclass(frozen=True)
class ExtractedLora:
    """A layer's tensors, ready for the kernels. ``quant`` set means ``weight`` is packed 4-bit bytes."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    A: Optional[torch.Tensor]
    B: Optional[torch.Tensor]
    scale: float
    quant: Optional[QuantState4bit] = None
    base: Optional[nn.Module] = None

    def projection(self) -> LoraProjection:
        return LoraProjection(self.weight, self.A, self.B, self.scale, self.bias, self.quant)


def extract_lora(layer, cache: Optional["weakref.WeakKeyDictionary"] = None) -> ExtractedLora:
    """Tensors of a supported LoRA layer (or a plain nn.Linear / bnb Linear4bit, without LoRA).

    The support checks and the wrapping of bitsandbytes' quant state run again only when one of
    the objects they depend on is not the one seen last time (see :func:`_identity`); a changed
    adapter, a merge, a disabled adapter or swapped parameters all show up there. ``cache``: the
    patched model's (its slot in the model's Stash, see ``new_cache``); calls from outside a patched
    model share one default cache.

    A checkpoint recomputing its forward inside backward must compute what that forward did, without
    the identity check: it takes the extraction made for the adapter selection in effect now (active
    adapter, disabled flag). One is kept per selection, so a forward with another adapter between a
    forward and its backward (TRL's reference pass: ``set_adapter("ref")`` and back) does not hand
    the recompute the other adapter's weights. A selection never seen outside backward gets the last
    extraction made.
    """
    cache = _default_cache if cache is None else cache
    entries = cache.get(layer)
    selector = _selector(layer)
    if entries is not None and _in_backward():
        entry = entries.get(selector)
        if entry is None:
            entry = entries[next(reversed(entries))]
        return _current(entry[2])
    key = _identity(layer)
    entry = entries.get(selector) if entries is not None else None
    if entry is not None and key is not None and tuple(map(id, key)) == entry[1]:
        return _current(entry[2])
    ex = _extract(layer)
    if key is not None:
        if entries is None:
            entries = cache[layer] = {}
        entries.pop(selector, None)          # the newest extraction stays last
        entries[selector] = (key, tuple(map(id, key)), ex)   # the key keeps its objects (and ids) alive
        while len(entries) > _SELECTIONS_KEPT:
            entries.pop(next(iter(entries)))
    return ex


_SELECTIONS_KEPT = 4


def _selector(layer):
    """Which adapter a PEFT layer runs now (active adapter(s), disabled flag); None for other layers."""
    active = getattr(layer, "_active_adapter", None)
    if active is None:
        return None
    return (tuple(active) if isinstance(active, list) else active, bool(getattr(layer, "_disable_adapters", False)))


def _current(ex: ExtractedLora) -> ExtractedLora:
    """A cached extraction, with a 4-bit weight's packed bytes read again (``.data`` is a new view)."""
    if ex.quant is None:
        return ex
    return ExtractedLora(ex.base.weight.data, ex.bias, ex.A, ex.B, ex.scale, ex.quant, ex.base)


def new_cache() -> "weakref.WeakKeyDictionary":
    """An extraction cache: layer (weakly held) -> {_selector(layer): (_identity(layer), its objects' ids,
    ExtractedLora)}, the newest last."""
    return weakref.WeakKeyDictionary()


_default_cache = new_cache()   # for calls from outside a patched model
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _in_backward() -> bool:
    return _graph_task_id() != -1


def _identity(layer) -> Optional[tuple]:
    """The objects (not values) extraction depends on, or None when the layer cannot be fused
    as it is now (disabled or merged adapter, not exactly one active adapter). Floats and flags
    are compared by identity too: setting a new value makes a new object. Read through the
    modules' own dicts: this runs for every projection of every layer, forward and recompute."""
    if _is_lora_layer(layer):
        if layer.disable_adapters or layer.merged:
            return None
        active = layer.active_adapters
        if len(active) != 1:
            return None
        name, modules = active[0], layer._modules
        A, B = modules["lora_A"]._modules.get(name), modules["lora_B"]._modules.get(name)
        if A is None or B is None:
            return None
        dropout = modules["lora_dropout"]._modules.get(name)
        lora = (name, _param(A, "weight"), _param(B, "weight"), dropout, getattr(dropout, "p", None),
                layer.scaling.get(name), getattr(layer, "cast_input_dtype_enabled", True))
        base = modules.get("base_layer")
        if base is None or "base_layer" in base._modules:
            base = layer.get_base_layer()
    else:
        lora, base = (), layer
    weight = _param(base, "weight")
    quant = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
    # a bnb Params4bit answers tensor properties through Python (__torch_function__): skip them
    trainable = weight.requires_grad if quant is None and weight is not None else None
    return (*lora, base, weight, trainable, _param(base, "bias"), quant, getattr(quant, "absmax", None))


def _param(module, name: str):
    value = module._parameters.get(name)
    return value if value is not None else getattr(module, name, None)


def _extract(layer) -> ExtractedLora:
    ok, reason = projection_support(layer)
    if not ok:
        raise UnsupportedLoraLayer(reason)
    base = _base_layer(layer)
    A = B = None
    scale = 1.0
    if _is_lora_layer(layer):
        name = layer.active_adapters[0]
        A, B, scale = layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])
    if _is_bnb_linear4bit(base):
        qs = QuantState4bit.from_bnb(_bnb_quant_state(base))
        return ExtractedLora(base.weight.data, base.bias, A, B, scale, qs, base)
    return ExtractedLora(base.weight, base.bias, A, B, scale, None, base)


# ----------------------------------------------------------------------------- dtype policy

def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _dtypes(ex: ExtractedLora, x: torch.Tensor, ac: Optional[torch.dtype]) -> tuple:
    """(compute dtype of the base matmul, LoRA dtype, output dtype) as PEFT + bnb would use;
    ``ac``: the autocast dtype in effect, or None."""
    if ex.quant is not None:
        base = ex.base
        if not getattr(base, "compute_type_is_set", True):  # bnb picks it on the first forward
            base.set_compute_type(x)
            base.compute_type_is_set = True
        cd, od = (getattr(base, "compute_dtype", None) or x.dtype), x.dtype
    else:
        cd = ac or ex.weight.dtype
        od = cd
    ld = ac or (ex.A.dtype if ex.A is not None else cd)
    return cd, ld, od


def _prepared(exs: list, x: torch.Tensor):
    """(projections, x cast to the compute dtype, LoRA compute dtype, output dtype). A and B stay
    as they are: the kernels cast them to the LoRA dtype inside their autograd functions."""
    ac = _autocast_dtype(x)
    policies = [_dtypes(ex, x, ac) for ex in exs]
    lora_policies = {p for p, ex in zip(policies, exs) if ex.A is not None}
    cd, _, od = policies[0]
    if any(p[0] != cd or p[2] != od for p in policies) or len(lora_policies) > 1:
        raise UnsupportedLoraLayer(f"projections disagree on dtypes: {sorted(map(str, set(policies)))}")
    ld = next(iter(lora_policies))[1] if lora_policies else cd
    return [ex.projection() for ex in exs], x.to(cd), ld, od


# ----------------------------------------------------------------------------- forwards

def fused_linear_forward(layer, x: torch.Tensor, cache=None) -> torch.Tensor:
    """``layer(x)`` for a supported LoRA layer (or plain base layer), through the fused kernel."""
    projs, xc, ld, od = _prepared([extract_lora(layer, cache)], x)
    return lora_projections(xc, projs, ld)[0].to(od)


def fused_o_forward(o_proj_layer, x: torch.Tensor, cache=None) -> torch.Tensor:
    return fused_linear_forward(o_proj_layer, x, cache)


def fused_qkv_forward(attn_module, x: torch.Tensor, q_name: str = "q_proj", k_name: str = "k_proj",
                      v_name: str = "v_proj", cache=None) -> tuple:
    """(q, k, v) = the three projections of x, each ``[..., out]``, sharing one saved x and one dx."""
    exs = [extract_lora(getattr(attn_module, n), cache) for n in (q_name, k_name, v_name)]
    projs, xc, ld, od = _prepared(exs, x)
    return tuple(o.to(od) for o in lora_projections(xc, projs, ld))


def fused_mlp_forward(mlp_module, x: torch.Tensor, activation: str, gate_name: str = "gate_proj",
                      up_name: Optional[str] = "up_proj", down_name: str = "down_proj", cache=None) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``. ``up_name=None``: ``gate_name`` is a fused gate_up projection
    (Phi-3's ``gate_up_proj``, halves [gate | up])."""
    gated_activation_spec(activation)   # ValueError for an unknown name
    names = mlp_projection_names(gate_name, up_name, down_name)
    exs = [extract_lora(getattr(mlp_module, n), cache) for n in names]
    projs, xc, ld, od = _prepared(exs, x)
    up = projs[1] if up_name else None
    return lora_gated_mlp(xc, projs[0], up, projs[-1], activation, ld).to(od)
