"""Built-in plugin: gradient checkpointing that owns the decoder layers' recompute.

transformers' ``GradientCheckpointingLayer`` calls ``self._gradient_checkpointing_func(fn,
*args)`` whenever ``self.gradient_checkpointing`` is true in training (from ``forward`` in
transformers >= 5.17, from ``__call__`` before). We set ``gradient_checkpointing`` (a flag true
while grad is enabled) and our ``LayerCheckpointer`` on each decoder layer instance, so every
training forward of every layer goes through ``CheckpointController.run_layer``, which keeps,
recomputes or offloads that layer as the current plan says. The model's ``_set_gradient_checkpointing`` is wrapped
so a later ``gradient_checkpointing_enable()`` (Trainer, TRL, Lightning, Axolotl) is recorded
and our attributes re-asserted instead of silently replaced; ``unpatch`` replays the
framework's last request, so the model ends up exactly as the framework left it.

Modes:
* ``recompute``: every layer is checkpointed, as one autograd node (``layer_node``; torch's
  non-reentrant checkpoint under torch.distributed and torch.compile); RNG replayed for dropout.
* ``offload``: every layer but the last is checkpointed with its input parked in (pinned)
  host memory, fetched back on a side stream before its backward (``offload``).
* ``auto``: the first training forward recomputes every layer and measures (``measure``); from
  then on each forward gets the plan of ``plan.plan_layers`` for its token count and the memory
  allocated when it starts. Larger inputs than the measured one trigger a new measurement.
  Without a device budget (CPU, no ``memory_budget_gb``) ``auto`` recomputes exactly when the
  framework enabled checkpointing.

Layers an engine already checkpoints are run plainly (``engines``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..hookspecs import hookimpl
from ..instance_patch import InstancePatcher
from ..plugins._modules import decoder_layers
from ..report import PatchReport
from .controller import CONTROLLER, CheckpointController
from .plan import AUTO, FRAMEWORK, OFFLOAD, PLAN_DECISIONS, RECOMPUTE


class CheckpointingPlugin:
    @hookimpl
    def sloth_patch_model(self, model, config, report: PatchReport, arch, patcher: InstancePatcher, context):
        if config.gradient_checkpointing == "off":
            return
        found = []
        for stack in (arch.stacks() if arch else ()) or (None,):
            layers = [(path, layer) for path, layer in decoder_layers(model, stack.layers if stack else "model.layers")]
            ours = [(path, layer) for path, layer in layers if _checkpointable(layer)]
            if stack is not None and len(ours) < len(layers):
                report.fallback("gradient_checkpointing", f"{type(layers[0][1]).__name__} is not a transformers "
                                                          f"GradientCheckpointingLayer: run without checkpointing",
                                stack.layers)
            found += ours
        if not found:
            report.fallback("gradient_checkpointing", f"{type(model).__name__} has no transformers "
                                                      f"GradientCheckpointingLayer decoder layers")
            return
        paths, layers = [p for p, _ in found], [layer for _, layer in found]
        budget = _budget(config, model)
        plan = context.hook.sloth_checkpoint_plan(model=model, config=config, layers=layers, budget_bytes=budget)
        plan = _validated(plan, len(layers))
        controller = CheckpointController(model, paths, layers, plan, budget, report)
        controller.apply(patcher)
        original = model._set_gradient_checkpointing

        def _set_gradient_checkpointing(self, *args, **kwargs):
            original(*args, **kwargs)
            controller.framework_request = (args, kwargs)
            controller.apply(None)

        patcher.bind(model, "_set_gradient_checkpointing", _set_gradient_checkpointing, wraps=original)
        # in the model's stash, not the patcher: unpatch needs it after the patcher restored everything
        context.stash[CONTROLLER] = controller
        controller.record_patch(config)

    @hookimpl(trylast=True)
    def sloth_checkpoint_plan(self, model, config, layers, budget_bytes) -> List[str]:
        mode, n = config.gradient_checkpointing, len(layers)
        if mode == "recompute":
            return [RECOMPUTE] * n
        if mode == "offload":
            return [OFFLOAD] * (n - 1) + [RECOMPUTE] if n else []
        return [AUTO] * n if budget_bytes is not None else [FRAMEWORK] * n

    @hookimpl
    def sloth_reassert(self, model, config, context):
        controller = context.stash.get(CONTROLLER, None)
        if controller is not None:
            controller.apply(None)

    @hookimpl
    def sloth_unpatch_model(self, model, context):
        controller = context.stash.pop(CONTROLLER, None)
        if controller is not None:
            controller.close()
            controller.replay_framework_request()


def _checkpointable(layer) -> bool:
    return hasattr(layer, "_gradient_checkpointing_func") or hasattr(type(layer), "gradient_checkpointing")


def _validated(plan: Optional[Sequence[str]], n: int) -> List[str]:
    plan = list(plan) if plan is not None else [FRAMEWORK] * n
    bad = sorted(set(plan) - set(PLAN_DECISIONS))
    if len(plan) != n or bad:
        raise ValueError(f"sloth_checkpoint_plan returned {plan!r}: need one of {', '.join(PLAN_DECISIONS)} "
                         f"for each of the {n} decoder layers")
    if AUTO in plan and set(plan) != {AUTO}:
        raise ValueError("sloth_checkpoint_plan: 'auto' must be given for every layer or none")
    return plan


def _budget(config, model) -> Optional[int]:
    if config.memory_budget_gb is not None:
        return int(config.memory_budget_gb * 2**30)
    device = next(model.parameters()).device
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    return None
