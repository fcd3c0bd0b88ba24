"""Built-in plugin: attention through our varlen kernel, as a named transformers implementation.

Every supported family looks its attention function up per call with
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``,
and builds its masks with ``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``. So we
register one implementation named ``"sloth"`` (both interfaces, globally: a new name changes
no other model) and set the model's ``config._attn_implementation_internal`` to it through the
InstancePatcher; ``unpatch`` puts the model's own name back.

The ``"sloth"`` mask function builds nothing: it returns a ``DeferredMask`` holding the
arguments transformers gave it (the 2-D padding mask among them). Our attention function reads
the samples from the padding mask, the collator's ``cu_seq_lens_q`` or the position ids (the
FlashAttention-2 padding-free contract), and runs ``packed_attention``. When it does not take a
call (a KV cache, attention dropout in training, ``output_attentions``, a caller's 4-D mask,
or ``attention="auto"`` deciding against it) it asks the DeferredMask for the mask the model's own
implementation would have built (made once per forward and shared by the layers) and calls
that implementation, so those calls compute exactly what the unpatched model computes.

``attention="auto"`` installs only on CUDA and takes packed batches (several samples in a row)
where a one-time measurement per shape finds the kernel faster than the model's own attention
(forward + backward, timed on the call's own tensors); the PatchReport notes each decision.
``"sloth"`` takes every call it can (reference path off CUDA). ``"sdpa"`` leaves the model's
attention alone.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from ..hookspecs import hookimpl
from ..instance_patch import InstancePatcher
from ..kernels.attention import Segments, find_segments, packed_attention, triton_supports
from ..report import PatchReport
from ..state import StashKey
from ._modules import decoder_layers, find_decoder, get_path

IMPLEMENTATION = "sloth"
_CONFIG_ATTR = "_attn_implementation_internal"


@dataclass
class _State:
    mode: str                          # "auto" | "sloth"
    original: str                      # the model's implementation before the patch
    report: Optional[PatchReport]
    decisions: Dict[tuple, bool] = field(default_factory=dict)


# Where sloth_attention finds the model's state: an attribute, set through the InstancePatcher, on
# each attention module of the patched model (the function gets the module, never the model).
# Nothing is stored on the config itself: transformers serialises a config's attributes when it
# saves a checkpoint. The state itself is the attention plugin's slot in the model's Stash.
_MODULE_ATTR = "_sloth_attention"
STATE = StashKey[_State]()


def _state_for(module) -> Optional[_State]:
    return getattr(module, _MODULE_ATTR, None)


class DeferredMask:
    """What the "sloth" mask interface returns: transformers' mask arguments, and on request the
    mask the model's own implementation builds from them (once per implementation)."""

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs
        self._built: Dict[str, Any] = {}
        self.segments: Optional[Segments] = None

    @property
    def padding_mask(self) -> Optional[torch.Tensor]:
        mask = self.kwargs.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def plain(self) -> bool:
        """No cache offsets and no mask the kernel cannot express (a caller's non-2-D mask)."""
        kw = self.kwargs
        mask = kw.get("attention_mask")
        return (kw.get("q_offset", 0) in (0, None) and kw.get("kv_offset", 0) in (0, None)
                and kw.get("q_length") == kw.get("kv_length")
                and (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2)))

    def build(self, implementation: str):
        if implementation not in self._built:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
            fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(implementation)
            # transformers builds no mask for implementations without a mask function
            self._built[implementation] = fn(**self.kwargs) if fn is not None else None
        return self._built[implementation]


def sloth_mask(**kwargs) -> DeferredMask:
    return DeferredMask(kwargs)


def sloth_attention(module, query, key, value, attention_mask, **kwargs):
    """The "sloth" entry of transformers' AttentionInterface (same signature as sdpa's)."""
    state = _state_for(module)
    if state is not None and _kernel_may_take(module, query, key, attention_mask, kwargs):
        segments = _segments(query, attention_mask, kwargs)
        if state.mode == "sloth" or (segments.packed and _auto_prefers_kernel(state, module, query, key, value,
                                                                              attention_mask, segments, kwargs)):
            return _kernel(module, query, key, value, segments, kwargs), None
    original = state.original if state is not None else "sdpa"
    return _model_attention(module, original)(module, query, key, value, _model_mask(attention_mask, original),
                                              **kwargs)


def _kernel_may_take(module, query, key, mask, kwargs) -> bool:
    if query.shape[2] != key.shape[2] or query.shape[0] != key.shape[0]:
        return False                                   # decoding with a cache
    if isinstance(mask, DeferredMask):
        if not mask.plain():
            return False
    elif mask is not None:
        return False                                   # a caller's own (4-D) mask
    if kwargs.get("dropout", 0.0) and module.training:
        return False
    if kwargs.get("output_attentions") or kwargs.get("s_aux") is not None:
        return False
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return False
    return True


def _segments(query, mask, kwargs) -> Segments:
    if isinstance(mask, DeferredMask) and mask.segments is not None:
        return mask.segments
    batch, _, seq, _ = query.shape
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    cu = cu_q if cu_q is not None and (cu_k is None or cu_k is cu_q or torch.equal(cu_k, cu_q)) else None
    max_len = kwargs.get("max_length_q") if cu is not None else None
    segments = find_segments(batch, seq, position_ids=kwargs.get("position_ids"),
                             padding_mask=mask.padding_mask if isinstance(mask, DeferredMask) else None,
                             cu_seqlens=cu, max_seqlen=int(max_len) if max_len is not None else None,
                             device=query.device)
    if isinstance(mask, DeferredMask):
        mask.segments = segments                       # shared by every layer of this forward
    return segments


def _is_causal(module, kwargs) -> bool:
    value = kwargs.get("is_causal")
    return bool(value if value is not None else getattr(module, "is_causal", True))


def _kernel(module, query, key, value, segments: Segments, kwargs):
    scaling = kwargs.get("scaling")
    out = packed_attention(query, key, value, segments=segments,
                           scale=scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1]),
                           causal=_is_causal(module, kwargs), sliding_window=kwargs.get("sliding_window") or None,
                           softcap=kwargs.get("softcap") or None)
    return out


def _model_attention(module, implementation: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        eager = sdpa_attention_forward if implementation == "eager" else None
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


def _model_mask(mask, implementation: str):
    return mask.build(implementation) if isinstance(mask, DeferredMask) else mask


# ------------------------------------------------------------------------------------------------
# attention="auto": measure once per shape bucket, on the call's own tensors.

def _bucket(query, key, segments: Segments, kwargs) -> tuple:
    tokens = int(query.shape[0] * query.shape[2])
    mean = max(1, tokens // max(1, segments.n_samples))
    return (str(query.device), query.dtype, query.shape[1], key.shape[1], query.shape[-1],
            bool(kwargs.get("sliding_window")), bool(kwargs.get("softcap")),
            tokens.bit_length(), mean.bit_length())


def _auto_prefers_kernel(state: _State, module, query, key, value, mask, segments: Segments, kwargs) -> bool:
    if triton_supports(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)) is not None:
        return False
    bucket = _bucket(query, key, segments, kwargs)
    if bucket not in state.decisions:
        if torch.compiler.is_compiling():
            return True                                 # no timing inside a graph: packed -> kernel
        ours, theirs = _measure(module, query, key, value, mask, segments, state.original, kwargs)
        state.decisions[bucket] = ours < theirs
        if ours < theirs and isinstance(mask, DeferredMask):
            mask._built.pop(state.original, None)      # the measurement's mask: not needed any more
        _note_decision(state, query, key, segments, ours, theirs)
    return state.decisions[bucket]


def _time_ms(fn, device: torch.device, reps: int = 3) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()                                                # warm up (and compile) first
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) * 1e3 / reps


def _measure(module, query, key, value, mask, segments, original, kwargs) -> Tuple[float, float]:
    q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
    grad = torch.randn(query.shape[0], query.shape[2], query.shape[1], value.shape[-1], device=query.device,
                       dtype=query.dtype)
    fallback = _model_attention(module, original)
    model_mask = _model_mask(mask, original)

    def ours():
        with torch.enable_grad():
            out = _kernel(module, q, k, v, segments, kwargs)
            torch.autograd.grad(out, (q, k, v), grad)

    def theirs():
        with torch.enable_grad():
            out = fallback(module, q, k, v, model_mask, **kwargs)[0]
            torch.autograd.grad(out, (q, k, v), grad.reshape(out.shape))

    # Identity saved-tensor hooks shadow those of an enclosing checkpoint / offload region: the
    # measurement's own graph must not be packed into the layer's checkpoint.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return _time_ms(ours, query.device), _time_ms(theirs, query.device)


def _note_decision(state: _State, query, key, segments: Segments, ours: float, theirs: float) -> None:
    if state.report is None:
        return
    tokens = query.shape[0] * query.shape[2]
    winner = "sloth kernel" if ours < theirs else f"model's {state.original}"
    text = (f"attention='auto': packed batch of {tokens} tokens in {segments.n_samples} samples "
            f"({query.dtype}, {query.shape[1]}/{key.shape[1]} heads, d={query.shape[-1]}): sloth {ours:.2f} ms vs "
            f"{state.original} {theirs:.2f} ms (fwd+bwd, one layer) -> {winner}")
    state.report.note(text)


# ------------------------------------------------------------------------------------------------

def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register(IMPLEMENTATION, sloth_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sloth_mask)


def _attention_configs(model, arch) -> list:
    """The distinct config objects the attention modules read (normally one, shared)."""
    configs = {id(model.config): model.config}
    for _, layer in decoder_layers(model, arch.layers):
        attn = get_path(layer, arch.attention)
        cfg = getattr(attn, "config", None)
        if cfg is not None:
            configs.setdefault(id(cfg), cfg)
    decoder = find_decoder(model, arch)
    if getattr(decoder, "config", None) is not None:
        configs.setdefault(id(decoder.config), decoder.config)
    return list(configs.values())


def _attention_modules(model, arch) -> list:
    """The attention module of every decoder layer (what the attention function is called with)."""
    modules = (get_path(layer, arch.attention) for _, layer in decoder_layers(model, arch.layers))
    return [m for m in modules if isinstance(m, torch.nn.Module)]


def _kernel_device(device: torch.device) -> bool:
    """Where attention='auto' may install the kernel (tests widen it to the interpreter)."""
    return device.type == "cuda"


def _why_not(model, arch, original: Optional[str]) -> Optional[str]:
    if arch is None:
        return "no architecture entry: the model keeps its attention"
    if arch.vision:
        return ("a vision-language model keeps its attention (image-token masks and its vision tower's attention "
                "are not proven with the kernel)")
    if not getattr(model, "_supports_flash_attn", False):
        return (f"{type(model).__name__} does not declare FlashAttention support, whose padding-free contract "
                f"(position ids, cu_seq_lens, sliding_window / softcap arguments) the kernel relies on")
    if not isinstance(original, str) or original == IMPLEMENTATION:
        return f"attention implementation {original!r} is not one we can hand calls back to"
    if original.startswith("paged"):
        return f"attention implementation {original!r} (paged KV cache) is for generation"
    try:
        import transformers.masking_utils  # noqa: F401
    except ImportError:
        return "this transformers has no masking_utils (needs transformers >= 4.53)"
    return None


class AttentionPlugin:
    @hookimpl
    def sloth_patch_model(self, model, config, report: PatchReport, arch, patcher: InstancePatcher, context):
        mode = config.attention
        original = getattr(model.config, "_attn_implementation", None)
        packed = (f" Padding-free batches are kept apart by the model's {original} attention: transformers reads "
                  f"the restarting position ids, but only without a KV cache (use_cache=False, which "
                  f"PaddingFreeCollator sets)." if config.padding_free else "")
        if mode == "sdpa":
            if packed:
                report.note(f"attention='sdpa' keeps the model's {original} attention.{packed}")
            return
        reason = _why_not(model, arch, original)
        device = next(model.parameters()).device
        if mode == "auto" and reason is None and not _kernel_device(device):
            reason = f"the kernel is GPU-only and the model is on {device.type}"
        if reason is not None:
            if mode == "sloth":
                report.fallback("attention", reason)
            else:
                report.note(f"attention='auto' keeps the model's {original} attention: {reason}.{packed}")
            return
        if getattr(model.config, "attention_dropout", 0.0):
            report.note("attention: attention_dropout > 0, so training calls keep the model's attention")
        _register()
        state = context.stash[STATE] = _State(mode=mode, original=original, report=report)
        for cfg in _attention_configs(model, arch):
            patcher.set(cfg, _CONFIG_ATTR, IMPLEMENTATION)
        for module in _attention_modules(model, arch):
            patcher.set(module, _MODULE_ATTR, state)
        if mode == "sloth":
            impl = "Triton varlen kernel" if device.type == "cuda" else "torch reference (Triton is CUDA-only)"
            detail = f"sloth {impl}; calls it cannot take go to the model's {original}"
        else:
            detail = (f"auto: packed batches take the sloth kernel where a one-time measurement per shape beats the "
                      f"model's {original}; other calls keep {original}")
        report.patched("attention", "", detail)
