"""Built-in plugin: the causal-LM loss from the final hidden states, in token chunks.

The CausalLM's ``forward`` (on this instance) runs the decoder, then asks the
``sloth_causal_lm_loss`` hook for the loss; full logits are never formed in training. In
eval, without labels, or when logits are asked for, the original forward runs unchanged.

Sharded heads. Under DDP, and under FSDP1/FSDP2 when the head belongs to the root unit, the
head's weight is whole while the model's forward runs (FSDP1 gives it as a Tensor view). When
``fully_shard`` made the head its own FSDP2 unit, its weight is a sharded DTensor outside the
head's forward, and the loss never reads it as such:
* a frozen head (LoRA) is gathered once (``full_tensor``) and the fused loss runs on it;
* a trainable head gets the fused loss run *as the head's forward*: the unit's own hooks
  gather the weight once, free it after, and reduce-scatter its gradient in backward, with the
  unit's mixed-precision and reduction settings.
An FSDP1 head of its own (a size-based wrap policy wraps a large lm_head) and heads that are
not a plain linear layer (LoRA on the head) run the same way, inside one call of their unit:
never one call per chunk, which would make ranks with different token counts issue different
numbers of collectives. A DTensor weight outside an FSDP unit (tensor parallel) gets the
model's own forward.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ..architectures import Architecture
from ..hookspecs import hookimpl
from ..instance_patch import InstancePatcher, has_instance_override
from ..kernels import chunked_cross_entropy, fused_linear_cross_entropy
from ..report import PatchReport
from ._modules import decoder_prefix, find_decoder

IGNORE_INDEX = -100
# Config attributes of families that scale logits in ways the generic path does not know.
_UNKNOWN_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


class LossPlugin:
    @hookimpl
    def sloth_patch_model(self, model, config, report: PatchReport, arch: Optional[Architecture],
                          patcher: InstancePatcher):
        if config.loss == "off":
            return
        reason = _unsupported_reason(model, arch) or _foreign_forward_reason(model)
        if reason:
            report.fallback("loss", reason)
            return
        softcap = arch.logit_softcap(model.config) if arch else _generic_softcap(model.config)
        _patch_forward(model, config, softcap, patcher)
        head = model.get_output_embeddings()
        impl = "fused linear CE" if _fused_head(head) else "chunked CE (module head)"
        report.patched("loss", "", f"{impl}, chunk={config.loss_chunk_size or 'auto'}"
                                   + (f", softcap={softcap:g}" if softcap else ""))

    @hookimpl(trylast=True)
    def sloth_causal_lm_loss(self, hidden_states, lm_head, labels, num_items_in_batch, config, softcap):
        kw = dict(ignore_index=IGNORE_INDEX, softcap=softcap, num_items_in_batch=num_items_in_batch,
                  chunk_size=config.loss_chunk_size)
        unit = _own_fsdp_unit(lm_head)
        if unit is not None:
            return _loss_in_own_unit(hidden_states, labels, *unit, kw)
        if _plain_linear(lm_head):
            return fused_linear_cross_entropy(hidden_states, lm_head.weight, labels, **kw)
        return chunked_cross_entropy(hidden_states, lm_head, labels, _out_features(lm_head), **kw)


def _linear_head(head) -> bool:
    """A bias-free ``nn.Linear`` whose forward is Linear's own (FSDP2 units are subclasses of it)."""
    return (isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward
            and "forward" not in head.__dict__ and head.bias is None and head.weight.dim() == 2)


def _plain_linear(head) -> bool:
    """A linear head whose weight can be read directly: a Parameter, or the plain Tensor view FSDP1
    gives a module inside its unit's forward. Quantised and DTensor weights are not plain."""
    return _linear_head(head) and type(head.weight) in (torch.nn.Parameter, torch.Tensor)


def _fused_head(head) -> bool:
    return _plain_linear(head) or (_linear_head(head) and _is_dtensor(head.weight))


# ---- sharded heads ------------------------------------------------------------------------------
# Looked up in sys.modules: when torch.distributed.tensor / .fsdp were never imported, no tensor
# can be a DTensor and no module an FSDP unit, and importing them here would cost time.

def _is_dtensor(t) -> bool:
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(t, cls)


def _own_fsdp_unit(head):
    """``(caller, module)`` when the head is an FSDP unit of its own, else None.

    Its parameters are sharded outside the unit's forward. FSDP2 hooks around the head's own
    forward (caller and module are the head); FSDP1's wrapper unshards in its forward, then
    calls the module it wraps.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return None
    if isinstance(head, getattr(fsdp, "FSDPModule", ())):
        return head, head
    if isinstance(head, getattr(fsdp, "FullyShardedDataParallel", ())):
        return head, head.module
    return None


def _model_loss_reason(head) -> Optional[str]:
    """Why this head is out of sloth's reach (the model's own loss runs), or None."""
    if _is_dtensor(getattr(head, "weight", None)) and _own_fsdp_unit(head) is None:
        return ("the lm_head weight is a DTensor outside any FSDP unit of its own (tensor parallel?): "
                "the model's own loss runs")
    return None


def _loss_in_own_unit(hidden, labels, caller, module, kw):
    """The loss of a head that is its own FSDP unit, with one gather of its weight per step.

    Every rank makes the same collective calls whatever its token count; a call of the unit per
    chunk would not (ranks with more valid tokens make more chunks) and the ranks would hang.
    """
    weight = getattr(module, "weight", None)
    if _is_dtensor(weight) and _linear_head(module) and not (weight.requires_grad and torch.is_grad_enabled()):
        # A frozen head (LoRA): one all-gather, and none in backward, where nothing is reduced.
        with torch.no_grad():
            full = weight.full_tensor()
        # What the unit's mixed-precision policy would have given its forward: the activations' dtype.
        if (full.dtype != hidden.dtype and hidden.is_floating_point()
                and not torch.is_autocast_enabled(hidden.device.type)):
            full = full.to(hidden.dtype)
        return fused_linear_cross_entropy(hidden, full, labels, **kw)

    real_forward = module.forward

    def loss_as_forward(h, y):
        # The unit's weights are whole here; the fused path computes the weight's gradient now, and
        # the unit reduce-scatters it in its post-backward with its own dtype and divide factor.
        if _plain_linear(module):
            return fused_linear_cross_entropy(h, module.weight, y, **kw)
        return chunked_cross_entropy(h, real_forward, y, _out_features(module), **kw)

    return _run_as_forward(caller, module, loss_as_forward, hidden, labels)


def _run_as_forward(caller, module, fn, *args):
    """``caller(*args)`` with ``fn`` standing in for ``module.forward``: what the unit does around
    the call (unshard before; reshard and the backward hooks after) runs as for the real forward."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = fn
    try:
        return caller(*args)
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.__dict__["forward"]


def _out_features(head) -> int:
    value = getattr(head, "out_features", None)
    return int(value) if value else int(head.weight.shape[0])


def _generic_softcap(model_config) -> Optional[float]:
    value = getattr(model_config, "final_logit_softcapping", None)
    return float(value) if value else None


def _unsupported_reason(model, arch) -> Optional[str]:
    decoder = find_decoder(model)
    if not isinstance(decoder, torch.nn.Module):
        return f"{type(model).__name__} has no decoder at .{decoder_prefix(model)}"
    if arch is None:
        for attr in _UNKNOWN_LOGIT_SCALES:
            if getattr(model.config, attr, None) not in (None, 1, 1.0):
                return f"unknown family scales its logits ({attr}); the model's own loss is kept"
    return None


def _foreign_forward_reason(model) -> Optional[str]:
    if not has_instance_override(model):
        return None
    func = getattr(model.__dict__["forward"], "__func__", model.__dict__["forward"])
    owner = getattr(func, "__module__", None) or "another library"
    if owner.startswith("trl."):
        return (f"TRL's SFTTrainer already replaced this model's forward with its own chunked loss ({owner}), "
                f"which never builds full logits either; sloth leaves it in charge of the loss")
    return f"the model's forward was already replaced by {owner}; sloth leaves that loss in charge"


def _patch_forward(model, config, softcap, patcher: InstancePatcher) -> None:
    original = model.forward
    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    if var_kw is None:
        raise TypeError(f"{type(model).__name__}.forward takes no **kwargs; the Trainer could not pass "
                        f"num_items_in_batch and sloth_plugins cannot patch its loss safely")
    from ..manager import get_plugin_manager
    hook = get_plugin_manager().hook
    warned = []

    def forward(self, *args, **kwargs):
        if (not self.training or config.return_logits or kwargs.get("fused_lm_head")
                or kwargs.get("return_dict") is False):
            return original(*args, **kwargs)
        reason = _model_loss_reason(self.get_output_embeddings())
        if reason:
            if not warned:
                warned.append(True)
                warnings.warn(f"sloth_plugins: {reason}", stacklevel=2)
            return original(*args, **kwargs)
        arguments = signature.bind_partial(*args, **kwargs).arguments
        arguments.update(arguments.pop(var_kw, {}))
        labels = arguments.pop("labels", None)
        shift_labels = arguments.pop("shift_labels", None)
        if (labels is None and shift_labels is None) or arguments.get("logits_to_keep", 0) not in (0, None):
            return original(*args, **kwargs)
        arguments.pop("logits_to_keep", None)
        num_items = arguments.pop("num_items_in_batch", None)
        # A training loss needs no KV cache, and with one transformers stops reading packed samples
        # from restarting position ids (padding-free batches would attend across samples).
        if arguments.get("use_cache") is None:
            arguments["use_cache"] = False
        decoder = find_decoder(self)
        outputs = decoder(**arguments)
        hidden = outputs[0]
        if shift_labels is None:
            # target of position t is labels[t + 1]; the last position has none
            shift_labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
        head = self.get_output_embeddings()
        shift_labels = shift_labels.to(hidden.device)
        loss = hook.sloth_causal_lm_loss(
            hidden_states=hidden.reshape(-1, hidden.shape[-1]), lm_head=head, labels=shift_labels.reshape(-1),
            num_items_in_batch=num_items, config=config, softcap=softcap)
        return _causal_lm_output(loss, outputs)

    patcher.bind(model, "forward", forward, wraps=original)


def _causal_lm_output(loss, decoder_outputs):
    from transformers.modeling_outputs import CausalLMOutputWithPast
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    carried = {k: v for k, v in decoder_outputs.items() if k in fields and k not in ("loss", "logits")}
    return CausalLMOutputWithPast(loss=loss, logits=None, **carried)
