"""Built-in plugin: the causal-LM loss from the final hidden states, in token chunks.

The CausalLM's ``forward`` (on this instance) runs the decoder, then asks the
``sloth_causal_lm_loss`` hook for the loss; full logits are never formed in training. In
eval, without labels, or when logits are asked for, the original forward runs unchanged.

What the report claims is what trains. A family without a table entry gets the fast loss only
where its loss is provably CE(lm_head(decoder output)): the head is a direct child of the
CausalLM beside the decoder, no other module holds weights, no router/auxiliary loss is
configured, and on the first training step the model's own loss on the same batch (same
dropout masks, no graph) equals sloth's; on a mismatch the model keeps its own forward for
good. Training calls that bypass the fast loss (no labels: the caller builds its loss from
the logits; router logits asked for) turn the report's loss line into a fallback.

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
from . import zero3
from ._modules import decoder_path, find_decoder, get_path
from .loss_semantics import ATTENTION_MASKED_MEAN, STANDARD, loss_semantics
from .router_outputs import RouterOutputs, router_outputs

IGNORE_INDEX = -100
# Config attributes of families that scale logits in ways the generic path does not know.
_UNKNOWN_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")
# Outputs a forward may be asked for that the fast path passes through from the decoder.
_CARRIED_OUTPUTS = ("output_attentions", "output_hidden_states")
_PENDING = "; {what}: pending verification against the model's own loss on the first training step"
_VERIFIED = "; {what}: verified equal to the model's own loss on the first training step"


class LossPlugin:
    @hookimpl
    def sloth_patch_model(self, model, config, report: PatchReport, arch: Optional[Architecture],
                          patcher: InstancePatcher, context):
        if config.loss == "off":
            return
        reason = (_no_lm_head_reason(model) or _unsupported_reason(model, arch) or _foreign_forward_reason(model)
                  or _zero3_reason(model.get_output_embeddings())
                  or (_unproven_reason(model) if arch is None else None))
        semantics, how = (loss_semantics(type(model), arch.logit_softcap_attr) if arch is not None and arch.vision
                          else (STANDARD, ""))
        if reason or semantics is None:
            report.fallback("loss", reason or f"{how}: the model's own loss is kept")
            return
        softcap = arch.logit_softcap(model.config) if arch else _generic_softcap(model.config)
        head = model.get_output_embeddings()
        impl = "fused linear CE" if _fused_head(head) else "chunked CE (module head)"
        detail = f"{impl}, chunk={config.loss_chunk_size or 'auto'}" + (f", softcap={softcap:g}" if softcap else "")
        router = router_outputs(model, arch, find_decoder(model, arch))
        if router is not None and router.aux is not None:
            detail += "; + the router load-balancing loss when output_router_logits"
        elif router is not None and router.carried:
            detail += "; router logits carried when output_router_logits (the model adds no loss term for them)"
        elif router is not None:
            detail += f"; {router.note}"
        if how:
            detail += f"; the model's own loss is the {semantics} one ({how})"
        # A family without an entry, and a vision-language model (whose forward merges the image
        # features between its inputs and the decoder), are checked against the model's own loss once.
        verify = arch is None or bool(arch.vision)
        what = "generic family" if arch is None else "vision-language model"
        pending, verified = _PENDING.format(what=what), _VERIFIED.format(what=what)
        entry = report.patched("loss", "", detail + (pending if verify else ""))
        _patch_forward(model, config, softcap, patcher, entry, verify=verify, hook=context.hook,
                       decoder=decoder_path(model, arch), semantics=semantics, notes=(pending, verified), router=router)

    @hookimpl(trylast=True)
    def sloth_causal_lm_loss(self, hidden_states, lm_head, labels, num_items_in_batch, config, softcap):
        kw = dict(ignore_index=IGNORE_INDEX, softcap=softcap, num_items_in_batch=num_items_in_batch,
                  chunk_size=config.loss_chunk_size)
        unit = _own_fsdp_unit(lm_head)
        if unit is not None:
            return _loss_in_own_unit(hidden_states, labels, *unit, kw)
        if _plain_linear(lm_head):
            weight = zero3.own_param(lm_head, "weight")
            if zero3.is_partitioned(weight) and not (weight.requires_grad and torch.is_grad_enabled()):
                # A frozen head under ZeRO-3 (LoRA): the loss runs as the head's own forward, so DeepSpeed
                # gathers and releases its weight where the unpatched model calls the head, through its own
                # hooks and prefetch bookkeeping (a tied head is also the embedding, which DeepSpeed fetches
                # and prefetches: a gather of our own beside that raced it on a GPU), and again for backward.
                def head_loss(h, y):      # the same Parameter, whole inside the head's forward
                    return fused_linear_cross_entropy(h, weight, y, **kw)
                return _run_as_forward(lm_head, lm_head, head_loss, hidden_states, labels)
            return fused_linear_cross_entropy(hidden_states, lm_head.weight, labels, **kw)
        return chunked_cross_entropy(hidden_states, lm_head, labels, _out_features(lm_head), **kw)


def _linear_head(head) -> bool:
    """A bias-free ``nn.Linear`` whose forward is Linear's own (FSDP2 units are subclasses of it).
    Read without gathering: under DeepSpeed ZeRO-3 the weight is a partitioned placeholder."""
    if not (isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward
            and "forward" not in head.__dict__ and zero3.own_param(head, "bias") is None):
        return False
    shape = zero3.full_shape(zero3.own_param(head, "weight"))
    return shape is not None and len(shape) == 2


def _plain_linear(head) -> bool:
    """A linear head whose weight can be read directly: a Parameter (under ZeRO-3 once gathered), or
    the plain Tensor view FSDP1 gives a module inside its unit's forward. Quantised and DTensor
    weights are not plain."""
    return _linear_head(head) and type(zero3.own_param(head, "weight")) in (torch.nn.Parameter, torch.Tensor)


def _fused_head(head) -> bool:
    return _plain_linear(head) or (_linear_head(head) and _is_dtensor(zero3.own_param(head, "weight")))


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


def _zero3_reason(head) -> Optional[str]:
    """Why a head under DeepSpeed ZeRO-3 gets the model's own loss, or None. A plain linear head's
    weight is gathered once per forward for the fused loss (``zero3.gather_for``); any other head
    would be called once per chunk by the chunked loss: one gather per chunk, and different numbers
    of collectives on ranks with different token counts."""
    if head is None or _plain_linear(head) or not zero3.under_zero3(head):
        return None
    return (f"DeepSpeed ZeRO-3 partitions the lm_head, a {type(head).__module__}.{type(head).__name__} rather "
            f"than a plain nn.Linear (LoRA or a quantised head?): the chunked loss would gather it once per chunk; "
            f"the model's own loss runs")


def _model_loss_reason(head) -> Optional[str]:
    """Why this head is out of sloth's reach (the model's own loss runs), or None."""
    if _is_dtensor(zero3.own_param(head, "weight")) and _own_fsdp_unit(head) is None:
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


def _no_lm_head_reason(model) -> Optional[str]:
    if model.get_output_embeddings() is not None:
        return None
    heads = [n for n, m in model.named_children() if m is not find_decoder(model)]
    return (f"{type(model).__name__} has no language-model head ({', '.join(heads) or 'another head'} on the "
            f"decoder: a reward / classification model): its own forward and loss run")


def _unsupported_reason(model, arch) -> Optional[str]:
    decoder = find_decoder(model, arch)
    if not isinstance(decoder, torch.nn.Module):
        return (f"{type(model).__name__} has no decoder at .{decoder_path(model, arch)} (a module whose forward takes "
                f"all the model's inputs and returns the final hidden states for its lm_head): the model's own "
                f"loss is kept")
    if arch is None:
        for attr in _UNKNOWN_LOGIT_SCALES:
            if getattr(model.config, attr, None) not in (None, 1, 1.0):
                return f"unknown family scales its logits ({attr}); the model's own loss is kept"
    return None


def _unproven_reason(model) -> Optional[str]:
    """Why the loss of a family without a table entry may not be CE(head(decoder output)), or None.

    The head must be a direct child of the CausalLM beside the decoder, with no other module holding
    weights (BERT's head transform lives in ``cls.predictions``), and no router / auxiliary loss may
    be configured. What this cannot see (code between decoder and head) the first training step checks.
    """
    cls = type(model).__name__
    config = model.config
    if getattr(config, "output_router_logits", False):
        return (f"{cls} adds a router auxiliary loss to the cross-entropy (config.output_router_logits=True); "
                f"the model's own loss is kept")
    if not hasattr(config, "output_router_logits"):
        aux = [k for k, v in vars(config).items() if ("aux_loss" in k or k.startswith("router_")) and v]
        if aux:
            return (f"{cls} configures an auxiliary loss ({', '.join(sorted(aux))}) sloth cannot tell is off; "
                    f"the model's own loss is kept")
    head = model.get_output_embeddings()
    decoder = getattr(model, model.base_model_prefix)
    children = dict(model.named_children())
    if not any(m is head for m in children.values()):
        path = next((n for n, m in model.named_modules() if m is head), "?")
        return (f"the output embeddings ({path}) are not a direct child of {cls}: its head may transform the "
                f"hidden states first; the model's own loss is kept")
    others = [n for n, m in children.items()
              if m is not head and m is not decoder and next(m.parameters(), None) is not None]
    if others:
        return (f"{cls} holds weights outside its decoder and head ({', '.join(others)}) that its loss may use; "
                f"the model's own loss is kept")
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


def _patch_forward(model, config, softcap, patcher: InstancePatcher, entry, verify: bool, hook, decoder: str,
                   semantics: str = STANDARD, notes=(_PENDING, _VERIFIED),
                   router: Optional[RouterOutputs] = None) -> None:
    """Bind the fast forward. ``entry`` is the report's loss line, revised when a training call shows
    that the fast loss does not run (or, with ``verify``, that it differs from the model's own).
    ``hook``: the hook relay the loss is asked through (``sloth_causal_lm_loss``). ``decoder``: the
    path of the module run for the final hidden states. ``semantics`` (loss_semantics): the model's
    own loss, which the fast one reproduces. ``router``: what a MoE family returns of its router
    (``router_outputs``): its output class, whether router logits are carried, the load-balancing loss
    added as the model's forward adds it."""
    original = model.forward
    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    if var_kw is None:
        raise TypeError(f"{type(model).__name__}.forward takes no **kwargs; the Trainer could not pass "
                        f"num_items_in_batch and sloth_plugins cannot patch its loss safely")
    warned = set()
    state = {"verify": verify, "mismatch": False}

    def record_model_loss(reason):
        """The report's line says (first reason only) that training calls like this one skip the fast loss."""
        if entry.patched:
            entry.patched, entry.detail = False, reason

    def fast(self, arguments, labels, shift_labels, num_items):
        # A training loss needs no KV cache, and with one transformers stops reading packed samples
        # from restarting position ids (padding-free batches would attend across samples).
        if arguments.get("use_cache") is None:
            arguments["use_cache"] = False
        carry = router is not None and router.carried and _router_logits_asked(arguments, self.config)
        if carry:
            arguments["output_router_logits"] = True
        module = get_path(self, decoder)
        if _takes_labels(module):
            # the model's own forward hands its labels to the decoder (some vision-language releases build
            # the training attention mask from them), so this one does too; it computes no loss
            arguments["labels"] = labels
        if semantics != STANDARD:
            num_items = None                # the model's own loss is a mean whatever the caller passes
        if semantics == ATTENTION_MASKED_MEAN and arguments.get("attention_mask") is not None:
            labels = labels.masked_fill(arguments["attention_mask"].to(labels.device) == 0, IGNORE_INDEX)
        outputs = module(**arguments)
        hidden = outputs[0]
        if shift_labels is None:
            # target of position t is labels[t + 1]; the last position has none
            shift_labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
        shift_labels = shift_labels.to(hidden.device)
        # Launched before the loss and read after it: the loss already waits for the labels (it
        # selects the valid tokens), so reading this adds no wait of its own.
        has_labels = (shift_labels != IGNORE_INDEX).any()
        loss = hook.sloth_causal_lm_loss(
            hidden_states=hidden.reshape(-1, hidden.shape[-1]), lm_head=self.get_output_embeddings(),
            labels=shift_labels.reshape(-1), num_items_in_batch=num_items, config=config, softcap=softcap)
        if "empty" not in warned and not bool(has_labels):
            warned.add("empty")
            warnings.warn(f"sloth_plugins: a training batch of {type(self).__name__} has no labels (every label "
                          f"is {IGNORE_INDEX}): its loss is 0.0 with zero gradients (transformers' own loss would "
                          f"be NaN). Warned once per model.", stacklevel=5)
        if router is not None:          # a MoE family: the model's own output class, aux_loss None without it
            extra = {"aux_loss": None} if "aux_loss" in router.fields() else {}
            if carry and router.aux is not None:
                extra["aux_loss"] = router.aux(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
                                               arguments.get("attention_mask"))
                loss = loss + self.router_aux_loss_coef * extra["aux_loss"].to(loss.device)
            return _output(router.output_class, loss, outputs, **extra), hidden.dtype
        return _causal_lm_output(loss, outputs), hidden.dtype

    def forward(self, *args, **kwargs):
        if (not self.training or config.return_logits or kwargs.get("fused_lm_head")
                or kwargs.get("return_dict") is False):
            return original(*args, **kwargs)
        head = self.get_output_embeddings()
        reason = _zero3_reason(head)
        if reason:
            record_model_loss(reason)
            return original(*args, **kwargs)
        reason = _model_loss_reason(head)
        if reason:
            if "head" not in warned:
                warned.add("head")
                warnings.warn(f"sloth_plugins: {reason}", stacklevel=2)
            return original(*args, **kwargs)
        if zero3.under_zero3(head) and zero3.own_param(head, "weight").requires_grad and torch.is_grad_enabled():
            # A trainable head's weight, read by the loss from this forward: gathered with this model's
            # parameters in its forward and backward, where its gradient reaches DeepSpeed as usual.
            # (A frozen head's loss runs as the head's own forward: sloth_causal_lm_loss.)
            try:
                zero3.gather_for(self, zero3.partitioned_params(head))
            except zero3.NotGathered as e:
                record_model_loss(f"{e}: the model's own loss runs")
                return original(*args, **kwargs)
        arguments = signature.bind_partial(*args, **kwargs).arguments
        arguments.update(arguments.pop(var_kw, {}))
        labels = arguments.pop("labels", None)
        shift_labels = arguments.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            if torch.is_grad_enabled():     # not generation: the caller trains on the logits
                record_model_loss("a training forward ran without labels: the caller computes the loss from the "
                                  "full logits (a Trainer compute_loss_func, label smoothing, a custom loop); "
                                  "sloth's fused loss does not run for such calls")
            return original(*args, **kwargs)
        if semantics != STANDARD and (shift_labels is not None or labels is None or
                                       not _mask_fits(arguments.get("attention_mask"), labels, semantics)):
            record_model_loss(f"a training call passed shift_labels or an attention mask that this model's own "
                              f"{semantics} loss reads differently: the model's own forward runs for such calls")
            return original(*args, **kwargs)
        _check_label_shape(arguments, labels if labels is not None else shift_labels,
                           "labels" if labels is not None else "shift_labels")
        if arguments.get("logits_to_keep", 0) not in (0, None):
            return original(*args, **kwargs)
        asked = _extra_outputs(arguments, self.config, router_logits_ok=router is not None and router.asking_is_safe)
        if asked:
            record_model_loss(f"a training call asked for {asked}, which sloth's loss does not produce (an extra "
                              f"loss term or outputs): the model's own forward runs for such calls")
            return original(*args, **kwargs)
        if state["mismatch"]:
            return original(*args, **kwargs)
        arguments.pop("logits_to_keep", None)
        num_items = arguments.pop("num_items_in_batch", None)
        if not state["verify"]:
            return fast(self, arguments, labels, shift_labels, num_items)[0]

        # First training step of a family without a table entry: the model's own loss on the same
        # batch and the same dropout masks, once, without a graph.
        restore_rng = _rng_snapshot(self)
        with torch.no_grad():
            reference = original(*args, **kwargs).loss
        restore_rng()
        out, dtype = fast(self, arguments, labels, shift_labels, num_items)
        verdict = _compare(out.loss, reference, dtype)
        if verdict == _DEFER:
            return out
        state["verify"] = False
        if verdict == _MATCH:
            entry.detail = entry.detail.replace(*notes)
            return out
        state["mismatch"] = True
        entry.patched, entry.detail = False, (
            f"the model's own loss differed from sloth's on the first training step ({reference.item():.6g} vs "
            f"{out.loss.item():.6g}): its forward does more than CE(lm_head(decoder output)); the model's own "
            f"loss runs")
        warnings.warn(f"sloth_plugins: {type(self).__name__}'s own loss ({reference.item():.6g}) differs from "
                      f"sloth's fused loss ({out.loss.item():.6g}) on the first training step; sloth falls back to "
                      f"the model's own forward for this model", stacklevel=4)
        restore_rng()
        return original(*args, **kwargs)

    patcher.bind(model, "forward", forward, wraps=original)


def _takes_labels(module) -> bool:
    """Whether ``module.forward`` names a ``labels`` parameter (not just **kwargs)."""
    try:
        parameter = inspect.signature(module.forward).parameters.get("labels")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def _mask_fits(mask, labels, semantics) -> bool:
    """Whether the attention mask is one the model's attention-masked loss reads as we do: none, or 2-D
    with the labels' shape (a 4-D mask, or a longer one from prefix tuning, is left to the model)."""
    if semantics != ATTENTION_MASKED_MEAN or mask is None:
        return True
    return isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(labels.shape)


def _check_label_shape(arguments, labels, name) -> None:
    ids = arguments.get("input_ids")
    embeds = arguments.get("inputs_embeds")
    tokens, what = (ids.shape, "input_ids") if ids is not None else (
        (embeds.shape[:-1], "inputs_embeds (without the hidden dim)") if embeds is not None else (None, None))
    if tokens is not None and tuple(labels.shape) != tuple(tokens):
        raise ValueError(f"sloth_plugins: {name} have shape {tuple(labels.shape)} but {what} have shape "
                         f"{tuple(tokens)}; a causal-LM loss needs one label per input token (-100 to ignore one)")


def _extra_outputs(arguments, model_config, router_logits_ok: bool = False) -> Optional[str]:
    """The output_* options of this call (or the config's router logits) that the fast path would drop.
    ``router_logits_ok``: a MoE family whose router logits the fast path returns as the model does (or
    that returns none, so asking for them changes nothing)."""
    carried = _CARRIED_OUTPUTS + (("output_router_logits",) if router_logits_ok else ())
    asked = [k for k, v in arguments.items() if k.startswith("output_") and k not in carried and v]
    if (not router_logits_ok and "output_router_logits" not in arguments
            and getattr(model_config, "output_router_logits", False)):
        asked.append("output_router_logits (config)")
    return ", ".join(asked) or None


def _router_logits_asked(arguments, model_config) -> bool:
    value = arguments.get("output_router_logits")
    return bool(getattr(model_config, "output_router_logits", False) if value is None else value)


_MATCH, _DEFER, _MISMATCH = 0, 1, 2


def _compare(loss, reference, dtype) -> int:
    """Whether sloth's loss equals the model's, agreed by every rank (they must all take the same path)."""
    if reference is None or not bool(torch.isfinite(reference)):
        verdict = _DEFER        # e.g. a batch without labels (NaN): check on the next one
    else:
        tol = 1e-4 if dtype == torch.float32 and not torch.is_autocast_enabled(loss.device.type) else 5e-3
        same = torch.allclose(loss.detach().float(), reference.detach().float().to(loss.device), rtol=tol, atol=tol)
        verdict = _MATCH if same else _MISMATCH
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor(verdict, device=loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        verdict = int(flag.item())
    return verdict


def _rng_snapshot(model):
    """A function putting back the RNG state of now, so a second forward draws the same dropout masks."""
    indices = sorted({p.device.index if p.device.index is not None else torch.cuda.current_device()
                      for p in model.parameters() if p.device.type == "cuda"})
    cpu, cuda = torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in indices]

    def restore():
        torch.set_rng_state(cpu)
        for i, s in zip(indices, cuda):
            torch.cuda.set_rng_state(s, i)
    return restore


NO_LOGITS = ("sloth_plugins: outputs.logits of a training step is None: sloth's chunked loss computed the loss from "
             "the hidden states in chunks and never formed the [tokens x vocab] logits. To read logits in training, "
             "patch with SlothConfig(return_logits=True) (SlothCallback(return_logits=True), "
             "SlothStrategy(return_logits=True), Axolotl sloth_return_logits: true), which costs the memory the "
             "chunked loss saves; or loss='off'. Warned once.")
# Readers of every field that are not the user's code: a missing logits is just None to them (FSDP1 and
# FSDP2 copy a forward's output dataclass field by field, transformers' ModelOutput reads its fields).
_FIELD_COPIERS = ("dataclasses", "torch.", "transformers.utils.generic", "copy", "pickle", "copyreg")
_warned_no_logits = []


def _get_logits(self):
    value = self.__dict__.get("logits")
    if value is None and not _warned_no_logits:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if not caller.startswith(_FIELD_COPIERS):
            _warned_no_logits.append(True)
            warnings.warn(NO_LOGITS, stacklevel=2)
    return value


def _set_logits(self, value):
    self.__dict__["logits"] = value


_OUTPUT_CLASSES: dict = {}


def _output_class(base):
    """``base`` (a transformers ModelOutput) whose ``logits`` are None as before but warn once, naming
    ``return_logits=True``, when user code reads them: ``outputs.logits.argmax()`` otherwise fails on
    None without pointing at sloth. Nothing raises (FSDP copies every field), ``keys()``,
    ``to_tuple()``, ``hasattr`` and pickling behave as for ``base``."""
    cls = _OUTPUT_CLASSES.get(base)
    if cls is None:
        name = f"Sloth{base.__name__}"
        cls = type(name, (base,), {"logits": property(_get_logits, _set_logits), "__module__": __name__,
                                   "__qualname__": name, "__doc__": _output_class.__doc__})
        globals()[name] = _OUTPUT_CLASSES[base] = cls        # importable by name: outputs pickle
    return cls


def _output(base, loss, decoder_outputs, **extra):
    cls = _output_class(base)
    fields = {f.name for f in dataclasses.fields(cls)}
    carried = {k: v for k, v in decoder_outputs.items() if k in fields and k not in ("loss", "logits", *extra)}
    return cls(loss=loss, logits=None, **extra, **carried)


def _causal_lm_output(loss, decoder_outputs):
    from transformers.modeling_outputs import CausalLMOutputWithPast
    return _output(CausalLMOutputWithPast, loss, decoder_outputs)
