"""Built-in plugin: the causal-LM loss from the final hidden states, in token chunks.

The CausalLM's ``forward`` (on this instance) runs the decoder, then asks the
``sloth_causal_lm_loss`` hook for the loss; full logits are never formed in training. In
eval, without labels, or when logits are asked for, the original forward runs unchanged.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from ..architectures import Architecture
from ..hookspecs import hookimpl
from ..instance_patch import InstancePatcher, has_instance_override
from ..kernels import chunked_cross_entropy, fused_linear_cross_entropy
from ..report import PatchReport

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
        impl = "fused linear CE" if _plain_linear(model.get_output_embeddings()) else "chunked CE (module head)"
        report.patched("loss", "", f"{impl}, chunk={config.loss_chunk_size or 'auto'}"
                                   + (f", softcap={softcap:g}" if softcap else ""))

    @hookimpl(trylast=True)
    def sloth_causal_lm_loss(self, hidden_states, lm_head, labels, num_items_in_batch, config, softcap):
        kw = dict(ignore_index=IGNORE_INDEX, softcap=softcap, num_items_in_batch=num_items_in_batch,
                  chunk_size=config.loss_chunk_size)
        if _plain_linear(lm_head):
            return fused_linear_cross_entropy(hidden_states, lm_head.weight, labels, **kw)
        return chunked_cross_entropy(hidden_states, lm_head, labels, _out_features(lm_head), **kw)


def _plain_linear(head) -> bool:
    return (type(head) is torch.nn.Linear and head.bias is None
            and type(head.weight) is torch.nn.Parameter and head.weight.dim() == 2)


def _out_features(head) -> int:
    value = getattr(head, "out_features", None)
    return int(value) if value else int(head.weight.shape[0])


def _generic_softcap(model_config) -> Optional[float]:
    value = getattr(model_config, "final_logit_softcapping", None)
    return float(value) if value else None


def _unsupported_reason(model, arch) -> Optional[str]:
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(decoder, torch.nn.Module):
        return f"{type(model).__name__} has no decoder at .{model.base_model_prefix}"
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

    def forward(self, *args, **kwargs):
        if (not self.training or config.return_logits or kwargs.get("fused_lm_head")
                or kwargs.get("return_dict") is False):
            return original(*args, **kwargs)
        arguments = signature.bind_partial(*args, **kwargs).arguments
        arguments.update(arguments.pop(var_kw, {}))
        labels = arguments.pop("labels", None)
        shift_labels = arguments.pop("shift_labels", None)
        if (labels is None and shift_labels is None) or arguments.get("logits_to_keep", 0) not in (0, None):
            return original(*args, **kwargs)
        arguments.pop("logits_to_keep", None)
        num_items = arguments.pop("num_items_in_batch", None)
        decoder = getattr(self, self.base_model_prefix)
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
