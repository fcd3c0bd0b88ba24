"""Built-in plugin: gradient checkpointing that owns the decoder layers' recompute.

transformers' ``GradientCheckpointingLayer`` calls ``self._gradient_checkpointing_func(fn,
*args)`` whenever ``self.gradient_checkpointing`` is true in training (from ``forward`` in
transformers >= 5.17, from ``__call__`` before). We set both attributes on each decoder
layer instance, per the plan, and wrap the model's ``_set_gradient_checkpointing`` so that a
later ``gradient_checkpointing_enable()`` (Trainer, TRL, Lightning, Axolotl) is recorded and
our plan re-asserted instead of silently replaced. ``unpatch`` replays the framework's last
request, so the model ends up exactly as the framework left it.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..hookspecs import hookimpl
from ..instance_patch import InstancePatcher
from ..report import PatchReport
from ._modules import decoder_layers

KEEP, RECOMPUTE, OFFLOAD, FRAMEWORK = "keep", "recompute", "offload", "framework"


class LayerCheckpointer:
    """The ``_gradient_checkpointing_func`` of one decoder layer."""

    def __init__(self, decision: str):
        self.decision = decision

    def __call__(self, function, *args, **kwargs):
        # Non-reentrant: gradients are identical to no checkpointing, inputs need not require
        # grad (PEFT), and RNG state (dropout) is replayed in the recompute.
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


class CheckpointingPlugin:
    @hookimpl
    def sloth_patch_model(self, model, config, report: PatchReport, arch, patcher: InstancePatcher):
        if config.gradient_checkpointing == "off":
            return
        layers = [(path, layer) for path, layer in decoder_layers(model, arch.layers if arch else "model.layers")
                  if hasattr(layer, "_gradient_checkpointing_func") or hasattr(type(layer), "gradient_checkpointing")]
        if not layers:
            report.fallback("gradient_checkpointing", f"{type(model).__name__} has no transformers "
                                                      f"GradientCheckpointingLayer decoder layers")
            return
        from ..manager import get_plugin_manager
        plan = get_plugin_manager().hook.sloth_checkpoint_plan(
            model=model, config=config, layers=[layer for _, layer in layers], budget_bytes=_budget(config, model))
        state = _PlanState(model, [layer for _, layer in layers], plan)
        state.apply(patcher)
        original = model._set_gradient_checkpointing

        def _set_gradient_checkpointing(self, *args, **kwargs):
            original(*args, **kwargs)
            state.framework_request = (args, kwargs)
            state.apply(None)

        patcher.bind(model, "_set_gradient_checkpointing", _set_gradient_checkpointing, wraps=original)
        # kept outside the patcher: it must still be there after the patcher restored everything
        model.__dict__["_sloth_checkpoint_replay"] = state.replay_framework_request
        for (path, _), decision in zip(layers, plan):
            report.patched("gradient_checkpointing", path,
                           "recompute when the framework enables checkpointing" if decision == FRAMEWORK
                           else decision)
        if config.gradient_checkpointing in ("auto", "offload"):
            report.note(f"gradient_checkpointing={config.gradient_checkpointing!r}: the measured memory plan and "
                        f"host offload are not implemented yet; layers recompute exactly when the framework "
                        f"enables gradient checkpointing" if config.gradient_checkpointing == "auto" else
                        "gradient_checkpointing='offload' is not implemented yet: every layer recomputes instead")

    @hookimpl(trylast=True)
    def sloth_checkpoint_plan(self, model, config, layers, budget_bytes) -> List[str]:
        mode = config.gradient_checkpointing
        if mode in ("recompute", "offload"):
            return [RECOMPUTE] * len(layers)
        return [FRAMEWORK] * len(layers)

    @hookimpl
    def sloth_unpatch_model(self, model):
        replay = model.__dict__.pop("_sloth_checkpoint_replay", None)
        if replay is not None:
            replay()


class _PlanState:
    def __init__(self, model, layers, plan):
        self.model, self.layers, self.plan = model, layers, plan
        self.framework_request = None

    def _framework_enabled(self) -> bool:
        if self.framework_request is None:
            return is_checkpointing_enabled(self.model)
        args, kwargs = self.framework_request
        return bool(kwargs.get("enable", args[0] if args else True))

    def apply(self, patcher: Optional[InstancePatcher]) -> None:
        follow = self._framework_enabled()
        for layer, decision in zip(self.layers, self.plan):
            enabled = decision in (RECOMPUTE, OFFLOAD) or (decision == FRAMEWORK and follow)
            for name, value in (("_gradient_checkpointing_func", LayerCheckpointer(decision)),
                                ("gradient_checkpointing", enabled)):
                if patcher is not None:
                    patcher.set(layer, name, value)
                else:
                    setattr(layer, name, value)

    def replay_framework_request(self) -> None:
        # Called after the patcher restored the pre-patch attributes.
        if self.framework_request is not None:
            args, kwargs = self.framework_request
            self.model._set_gradient_checkpointing(*args, **kwargs)


def is_checkpointing_enabled(model) -> bool:
    """What the framework asked for: HF renamed the property in v5 (old name warns)."""
    cls = type(model)
    name = "is_activation_checkpointing" if hasattr(cls, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _budget(config, model) -> Optional[int]:
    if config.memory_budget_gb is not None:
        return int(config.memory_budget_gb * 2**30)
    device = next(model.parameters()).device
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    return None
