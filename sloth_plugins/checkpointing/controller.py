"""The run phase: every training forward of a decoder layer goes through ``run_layer``.

``CheckpointController`` (one per patched model, in the model's Stash) holds the decisions in
force and runs each layer accordingly: kept, recomputed (``layer_node``, or torch's
non-reentrant checkpoint where that one-node checkpoint is not usable) or offloaded
(``offload``). With ``auto`` it asks its ``MemoryMeter`` (``measure``) whether this forward is
measured and its ``AutoPlanner`` (``plan``) for the plan of the others; layers an engine's own
checkpoint runs (``engines``) are run plainly.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from ..instance_patch import InstancePatcher
from ..logs import is_rank_zero, logger
from ..models import resolve_causal_lm
from ..plugins.zero3 import under_zero3
from ..report import PatchReport
from ..state import StashKey, model_stash
from . import layer_node
from .engines import EngineLayers, engine_checkpoint_phase
from .measure import MemoryMeter, hidden_states
from .offload import ActivationOffloader
from .plan import AUTO, FRAMEWORK, KEEP, OFFLOAD, RECOMPUTE, AutoPlanner, CheckpointPlan, MemoryModel

GiB = float(2 ** 30)


class _WhileGradEnabled:
    """A layer's ``gradient_checkpointing`` flag that is true exactly while autograd records.

    transformers 5.16 routes a layer through ``_gradient_checkpointing_func`` whenever the flag
    is true in training mode, and then drops the KV cache, even under ``no_grad`` (generation
    from a model in train mode). Our flag stays on for every training forward and off there.
    """

    def __bool__(self) -> bool:
        return torch.is_grad_enabled()

    def __repr__(self) -> str:
        return "True while grad is enabled (sloth_plugins)"


GRAD_ENABLED = _WhileGradEnabled()


class LayerCheckpointer:
    """The ``_gradient_checkpointing_func`` of one decoder layer."""

    def __init__(self, controller: "CheckpointController", index: int):
        self.controller, self.index = controller, index

    def __call__(self, function, *args, **kwargs):
        return self.controller.run_layer(self.index, function, args, kwargs)


class CheckpointController:
    """Per patched model: the decisions in force, the offloader; ``meter`` and ``planner`` for auto."""

    def __init__(self, model, paths: Sequence[str], layers: Sequence[torch.nn.Module], plan: Sequence[str],
                 budget_bytes: Optional[int], report: PatchReport):
        self.model, self.paths, self.layers = model, list(paths), list(layers)
        self.requested_plan = tuple(plan)
        # without a budget there is nothing to plan against: "auto" then follows the framework
        self.auto = bool(plan) and all(d == AUTO for d in plan) and budget_bytes is not None
        self.report = report
        self.framework_request = None
        self._framework_at_patch = is_checkpointing_enabled(model)
        self.checkpointers = [LayerCheckpointer(self, i) for i in range(len(layers))]
        self.parameters = [layer_node.LayerParameters(layer) for layer in layers]
        self.offloader = ActivationOffloader()
        self.one_node = True          # layer_node where it is usable; False: always torch's checkpoint
        self.generation = 0
        self.decisions: Tuple[str, ...] = self._static_decisions()
        self.meter = MemoryMeter(self.layers, self.offloader)     # auto: measure
        self.planner = AutoPlanner(budget_bytes)                  # auto: plan
        self.engines = EngineLayers(len(self.layers), report, self.auto)
        self._entries: list = []      # the report's line per layer
        self._note_index: Optional[int] = None
        self._last_index: Optional[int] = None

    # ---- what tests, benchmarks and the report read ---------------------------------------------
    @property
    def plan(self) -> Optional[CheckpointPlan]:
        """auto's plan in force (None before its first plan)."""
        return self.planner.plan

    @property
    def budget_bytes(self) -> Optional[int]:
        return self.planner.budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: Optional[int]) -> None:
        self.planner.budget_bytes = value     # plans already made stay cached; set_memory_budget forgets them

    @property
    def measured_peak_bytes(self) -> Optional[int]:
        """The peak measured in the last step that verified a new plan (None before one)."""
        return self.meter.measured_peak_bytes

    @property
    def engine_layers(self) -> set:
        """Indices of the layers an engine's own checkpoint runs (we run them plainly)."""
        return self.engines.indices

    @property
    def settled(self) -> bool:
        """No measurement pending: auto has a plan and is not measuring a step (for benchmarks' warm-up)."""
        return (not self.auto or self.engines.all()
                or (self.plan is not None and self.meter.window is None and self.meter.probing is None))

    def set_memory_budget(self, budget_bytes: int) -> None:
        """A new budget for ``auto``: the next training forward plans against it."""
        self.planner.set_budget(budget_bytes)

    def our_layers(self) -> List[int]:
        """Indices of the layers we checkpoint (all but those an engine checkpoints); auto plans these."""
        return self.engines.ours()

    # ---- attributes on the layers -------------------------------------------------------------
    def framework_enabled(self) -> bool:
        if self.framework_request is None:
            return self._framework_at_patch
        args, kwargs = self.framework_request
        return bool(kwargs.get("enable", args[0] if args else True))

    def apply(self, patcher: Optional[InstancePatcher]) -> None:
        # Always on, always ours: run_layer decides per forward (FRAMEWORK follows the request),
        # so the attributes never change after patch and unpatch restores them exactly.
        for parameters in self.parameters:
            parameters.forget()
        for layer, checkpointer in zip(self.layers, self.checkpointers):
            for name, value in (("_gradient_checkpointing_func", checkpointer),
                                ("gradient_checkpointing", GRAD_ENABLED)):
                if patcher is not None:
                    patcher.set(layer, name, value)
                else:
                    setattr(layer, name, value)

    def replay_framework_request(self) -> None:
        # Called after the patcher restored the pre-patch attributes.
        if self.framework_request is not None:
            args, kwargs = self.framework_request
            self.model._set_gradient_checkpointing(*args, **kwargs)

    def close(self) -> None:
        self.meter.clear()
        self.offloader.clear()

    def _static_decisions(self) -> Tuple[str, ...]:
        follow = RECOMPUTE if self.framework_enabled() else KEEP
        auto = RECOMPUTE if self.auto else follow          # auto: its first forward measures with recompute
        return tuple(follow if d == FRAMEWORK else (auto if d == AUTO else d) for d in self.requested_plan)

    # ---- the training forward -------------------------------------------------------------------
    def run_layer(self, index: int, function, args: tuple, kwargs: dict):
        if not torch.is_grad_enabled():
            return function(*args, **kwargs)      # also the forward of a reentrant engine checkpoint
        if engine_checkpoint_phase() is not None:
            if self.engines.add(index, self._entries):
                self.planner.forget()             # planned for layers that are no longer ours
            return function(*args, **kwargs)
        # A new forward starts at the first layer we run (layer 0 unless an engine checkpoints it).
        if self._last_index is None or index <= self._last_index:
            self._begin_forward(function, args)
        self._last_index = index
        generation, decision = self.generation, self.decisions[index]
        meter = self.meter
        if meter.probing is not None:
            meter.probe(index, function, args, kwargs)
        if decision == KEEP:
            out = function(*args, **kwargs)
        elif (self.one_node and not self.parameters[index].fallback
              and layer_node.usable(function, kwargs)):
            offload, watch = decision == OFFLOAD, self.parameters[index]
            out = layer_node.checkpoint_layer(function, args, watch.trainable(),
                                              self.offloader if offload else None,
                                              (generation, index) if offload else None, watch)
        elif decision == OFFLOAD:
            with self.offloader.hooks(generation, index):
                out = checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
        else:
            # Non-reentrant: gradients are identical to no checkpointing, inputs need not require
            # grad (PEFT), and RNG state (dropout) is replayed in the recompute.
            out = checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
        if self._wants_backward_hook(index):
            _on_backward_start(out, functools.partial(self._layer_backward_started, generation, index))
        if meter.probing is not None and index == len(self.layers) - 1:
            self._finish_probe()
        return out

    def _begin_forward(self, function, args: tuple) -> None:
        self.generation += 1
        self.meter.window = None  # a window whose backward never came
        if self.meter.probing is not None:
            self._finish_probe()  # the last layer did not run (sliced layers, an exception): keep what was counted
        if not self.auto:
            self.decisions = self._static_decisions()
            return
        hidden = hidden_states(function, args)
        tokens = int(hidden.shape[:-1].numel()) if hidden is not None and hidden.dim() > 0 else None
        device = hidden.device if hidden is not None else next(self.model.parameters()).device
        meter = self.meter
        meter.begin_forward(device)
        if meter.needs_measurement(tokens, device):
            self.decisions = (RECOMPUTE,) * len(self.layers)
            meter.start(self.generation, device, tokens, self.decisions)
            return
        plan = self.planner.plan_for(tokens, self.memory_model(device, tokens, meter.forward_base_bytes),
                                     lambda: self._planned_layers(tokens))
        if self.plan is None or plan.decisions != self.plan.decisions:
            self._record_plan(plan, tokens, device)
        self.planner.plan, self.decisions = plan, self._all_layers(plan.decisions)
        if meter.counters(device) is not None and self.planner.should_verify(plan):
            meter.open_window(self.generation, device, tokens, self.decisions, plan)

    def _finish_probe(self) -> None:
        if self.meter.finish_probe():
            self.planner.forget()

    def _wants_backward_hook(self, index: int) -> bool:
        window = self.meter.window
        if window is not None and window.generation == self.generation:
            return True                     # the first of these hooks to fire marks the backward's start
        return OFFLOAD in self.decisions[max(0, index - 1):index + 1]

    def _layer_backward_started(self, generation: int, index: int) -> None:
        # this layer's input (when the layer above did not already ask), then the next layer's
        self.offloader.prefetch(generation, index)
        if index > 0:
            self.offloader.prefetch(generation, index - 1)
        window = self.meter.window
        if window is not None and window.generation == generation and not window.in_backward:
            if self.meter.probing is not None:
                self._finish_probe()        # the forward is over even if its last layer did not run
            window.pause()                  # the forward (and loss) phase ends here
            window.in_backward = True
            window.resume()
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._close_window, window))

    def _close_window(self, window) -> None:
        if self.meter.close_window(window, self.our_layers()):
            self.planner.forget()
            if window.plan is not None:
                self._update_note(window.plan, window.tokens, window.device)

    # ---- auto: planning -----------------------------------------------------------------------
    def memory_model(self, device: torch.device, tokens: Optional[int] = None,
                     base_bytes: Optional[int] = None) -> MemoryModel:
        """The plan's memory model; base: ``base_bytes``, else what is allocated now (0 without counters)."""
        return self.meter.memory_model(device, tokens, base_bytes)

    def _planned_layers(self, tokens: Optional[int]):
        layers = self.meter.scaled(tokens)
        return [layers[i] for i in self.our_layers()]

    def _all_layers(self, ours: Sequence[str]) -> Tuple[str, ...]:
        # an engine's layers are recomputed by the engine: that is what their activations cost
        decisions = [RECOMPUTE] * len(self.layers)
        for i, decision in zip(self.our_layers(), ours):
            decisions[i] = decision
        return tuple(decisions)

    # ---- report -------------------------------------------------------------------------------
    def record_patch(self, config) -> None:
        for path, decision in zip(self.paths, self.requested_plan):
            if decision == AUTO and not self.auto:
                decision = FRAMEWORK
            detail = {FRAMEWORK: "recompute when the framework enables checkpointing",
                      AUTO: "auto: planned after measuring the first training step"}.get(decision, decision)
            self.report.patched("gradient_checkpointing", path, detail)
            self._entries.append(self.report.entries[-1])
        if config.gradient_checkpointing == "auto" and not self.auto:
            self.report.note("gradient_checkpointing='auto' without a device memory budget (no CUDA device and no "
                             "memory_budget_gb): layers recompute exactly when the framework enables checkpointing")
        elif self.auto:
            device = next(self.model.parameters()).device
            tail = ("" if device.type == "cuda" else
                    "; no device memory counters here, so the budget applies to the layers' activations alone")
            self.report.note(f"gradient_checkpointing='auto': budget {self.budget_bytes / GiB:.2f} GiB; the first "
                             f"training forward recomputes every layer and measures, then each layer is kept, "
                             f"recomputed or offloaded{tail}")
            self._note_index = len(self.report.notes) - 1

    def _record_plan(self, plan: CheckpointPlan, tokens: Optional[int], device: torch.device) -> None:
        for i, decision in zip(self.our_layers(), plan.decisions):
            self._entries[i].detail = f"auto: {decision}"
        self.meter.measured_peak_bytes = None
        self._update_note(plan, tokens, device)
        logger.debug("sloth_plugins gradient_checkpointing auto plan: %s", plan.summary())
        self._announce(plan)

    def _announce(self, plan: CheckpointPlan) -> None:
        """The decisions a user would not expect, at INFO on rank 0: no recompute although the
        framework enabled checkpointing, and offloading to host memory."""
        if not is_rank_zero():
            return
        counts = plan.counts()
        budget = f"{plan.budget_bytes / GiB:.2f} GiB"
        if counts[KEEP] == len(plan.decisions) and self.framework_enabled():
            logger.info("sloth_plugins: gradient checkpointing is enabled, but auto keeps all %d layers' activations "
                        "(no recompute): they fit the %s budget. SlothConfig(gradient_checkpointing='recompute') "
                        "recomputes regardless; memory_budget_gb sets the budget", len(plan.decisions), budget)
        if counts[OFFLOAD]:
            logger.info("sloth_plugins: auto offloads the inputs of %d of %d layers to host memory to stay under the "
                        "%s budget (%s)", counts[OFFLOAD], len(plan.decisions), budget, plan.summary())

    def _update_note(self, plan: CheckpointPlan, tokens: Optional[int], device: torch.device) -> None:
        text = f"gradient_checkpointing auto plan for {tokens} tokens: {plan.summary()}"
        if self.measured_peak_bytes is not None:
            text += f"; measured peak {self.measured_peak_bytes / GiB:.2f} GiB"
        elif self.meter.counters(device) is None:
            text += " (activations only: no device memory counters on this device)"
        if under_zero3(self.model):
            text += ZERO3_PLAN_CAVEAT
            if is_rank_zero():
                warnings.warn("sloth_plugins: gradient_checkpointing auto plan" + ZERO3_PLAN_CAVEAT, stacklevel=2)
        if self._note_index is None:
            self.report.note(text)
            self._note_index = len(self.report.notes) - 1
        else:
            self.report.notes[self._note_index] = text


# RESULTS 4.3: ZeRO-3 with offload, 8B, a 15.04 GiB budget: predicted 14.88 GiB, the steps peaked at 16.45 GiB
ZERO3_PLAN_CAVEAT = ("; under DeepSpeed ZeRO-3 the plan does not count the parameters DeepSpeed gathers and "
                     "prefetches around each layer, so the steps can peak above the budget (10% over in the "
                     "8B offload benchmark): leave room, or leave memory_budget_gb unset")


CONTROLLER = StashKey[CheckpointController]()   # the checkpointing plugin's slot in the model's Stash


def get_checkpoint_controller(model: Any) -> Optional[CheckpointController]:
    """The checkpoint controller of a patched model (PEFT / DDP wrappers are peeled off), or None.

    Public: benchmarks and tests read the plan in force (``decisions``, ``plan``, ``settled``),
    set a budget (``set_memory_budget``) or look at the ``offloader`` and the ``meter`` through it.
    """
    try:
        stash = model_stash(resolve_causal_lm(model))
    except TypeError:
        return None
    return stash.get(CONTROLLER, None) if stash is not None else None


def is_checkpointing_enabled(model) -> bool:
    """What the framework asked for: HF renamed the property in v5 (old name warns)."""
    cls = type(model)
    name = "is_activation_checkpointing" if hasattr(cls, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _on_backward_start(out: Any, callback) -> None:
    """Call ``callback()`` when the gradient of the layer's output arrives, i.e. its backward starts."""
    candidates = out if isinstance(out, (tuple, list)) else (out,)
    for t in candidates:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda grad: callback())
            return
