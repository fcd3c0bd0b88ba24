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
* ``recompute``: every layer is checkpointed, as one autograd node (``layer_checkpoint``; torch's
  non-reentrant checkpoint under torch.distributed and torch.compile); RNG replayed for dropout.
* ``offload``: every layer but the last is checkpointed with its input parked in (pinned)
  host memory, fetched back on a side stream before its backward (``checkpoint_offload``).
* ``auto``: the first training forward recomputes every layer and counts, per layer, the
  bytes autograd would save without checkpointing (a probe forward under a counting
  ``saved_tensors_hooks``, RNG forked so dropout is untouched); on CUDA it also measures the
  step's peak to calibrate what the plan does not control. From then on each forward gets
  the plan of ``checkpoint_plan.plan_layers`` for its token count and the memory allocated
  when it starts. Larger inputs than the measured one trigger a new measurement. Without a
  device budget (CPU, no ``memory_budget_gb``) ``auto`` recomputes exactly when the framework
  enabled checkpointing.

An engine that already checkpoints a decoder layer (FSDP's ``apply_activation_checkpointing`` /
``checkpoint_wrapper``, accelerate's and Lightning's activation checkpointing, reentrant or
not) has it run plainly by ``run_layer``: no second recompute, no offload, no probe. Those
layers are named in the report once, and ``auto`` plans the others.
"""
from __future__ import annotations

import functools
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from .. import layer_checkpoint
from ..layer_checkpoint import tensors_in
from ..checkpoint_offload import ActivationOffloader, offload_min_bytes
from ..checkpoint_plan import (KEEP, OFFLOAD, RECOMPUTE, CheckpointPlan, LayerMemory, MemoryModel, activation_peaks,
                               plan_layers)
from ..hookspecs import hookimpl
from ..instance_patch import InstancePatcher
from ..models import resolve_causal_lm
from ..report import PatchReport
from ..state import StashKey, model_stash
from ._modules import decoder_layers

logger = logging.getLogger("sloth_plugins")

FRAMEWORK, AUTO = "framework", "auto"
PLAN_DECISIONS = (KEEP, RECOMPUTE, OFFLOAD, FRAMEWORK, AUTO)
_MAX_VERIFICATIONS = 4        # steps whose peak auto measures to check a new plan (each resets CUDA peak stats)
_MAX_FAILED_MEASUREMENTS = 3  # measuring forwards without a backward before auto stops waiting for one
_MAX_MEASUREMENTS = 8         # probing costs a second forward of every layer: beyond this, scale up instead
_REMEASURE_GROWTH = 1.1       # inputs this much larger than the measured ones are measured again
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


class CheckpointingPlugin:
    @hookimpl
    def sloth_patch_model(self, model, config, report: PatchReport, arch, patcher: InstancePatcher, context):
        if config.gradient_checkpointing == "off":
            return
        found = [(path, layer) for path, layer in decoder_layers(model, arch.layers if arch else "model.layers")
                 if hasattr(layer, "_gradient_checkpointing_func") or hasattr(type(layer), "gradient_checkpointing")]
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


def get_checkpoint_controller(model) -> Optional["CheckpointController"]:
    """The controller of a patched model (PEFT / DDP wrappers are peeled off), or None."""
    try:
        stash = model_stash(resolve_causal_lm(model))
    except TypeError:
        return None
    return stash.get(CONTROLLER, None) if stash is not None else None


class CudaMemory:
    """The allocator counters auto reads; tests substitute a scripted one on CPU."""

    @staticmethod
    def allocated(device: torch.device) -> int:
        return torch.cuda.memory_allocated(device)

    @staticmethod
    def max_allocated(device: torch.device) -> int:
        return torch.cuda.max_memory_allocated(device)

    @staticmethod
    def reset_peak(device: torch.device) -> None:
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class _Window:
    """One forward+backward whose peak memory is being measured."""
    generation: int
    device: torch.device
    memory: Any                       # CudaMemory or a substitute
    tokens: Optional[int]
    decisions: Tuple[str, ...]
    base: int
    plan: Optional[CheckpointPlan]    # None while measuring; the plan being verified otherwise
    forward_peak: int = 0
    in_backward: bool = False

    def pause(self) -> None:
        self.forward_peak = max(self.forward_peak, self.memory.max_allocated(self.device))

    def resume(self) -> None:
        self.memory.reset_peak(self.device)


class CheckpointController:
    """Per patched model: the plan in force, the auto measurements, the offloader."""

    def __init__(self, model, paths: Sequence[str], layers: Sequence[torch.nn.Module], plan: Sequence[str],
                 budget_bytes: Optional[int], report: PatchReport):
        self.model, self.paths, self.layers = model, list(paths), list(layers)
        self.requested_plan = tuple(plan)
        # without a budget there is nothing to plan against: "auto" then follows the framework
        self.auto = bool(plan) and all(d == AUTO for d in plan) and budget_bytes is not None
        self.budget_bytes = budget_bytes
        self.report = report
        self.framework_request = None
        self._framework_at_patch = is_checkpointing_enabled(model)
        self.checkpointers = [LayerCheckpointer(self, i) for i in range(len(layers))]
        self.parameters = [layer_checkpoint.LayerParameters(layer) for layer in layers]
        self.offloader = ActivationOffloader()
        self.one_node = True          # layer_checkpoint where it is usable; False: always torch's checkpoint
        self.generation = 0
        self.decisions: Tuple[str, ...] = self._static_decisions()
        # auto
        self.plan: Optional[CheckpointPlan] = None
        self.layer_memory: Optional[List[LayerMemory]] = None
        self.measured_tokens: Optional[int] = None
        self.forward_overhead: Optional[int] = None
        self.backward_overhead: Optional[int] = None
        self.measured_peak_bytes: Optional[int] = None
        self.forward_base_bytes: Optional[int] = None     # allocated when the last training forward's layers began
        self.measurements = 0
        self._failed_measurements = 0
        self._probing: Optional[List[Optional[LayerMemory]]] = None
        self._probe_tokens: Optional[int] = None
        self._window: Optional[_Window] = None
        self._verified: set = set()
        self._plans: "OrderedDict[tuple, CheckpointPlan]" = OrderedDict()
        self._entries: list = []
        self._note_index: Optional[int] = None
        self.engine_layers: set = set()   # layers an engine's own checkpoint runs; we run them plainly
        self._engine_note_index: Optional[int] = None
        self._last_index: Optional[int] = None
        self._warned_over_budget = False
        self.memory = None            # None: CudaMemory on CUDA devices, no counters elsewhere

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

    @property
    def settled(self) -> bool:
        """No measurement pending: auto has a plan and is not measuring a step (for benchmarks' warm-up)."""
        return (not self.auto or len(self.engine_layers) == len(self.layers)
                or (self.plan is not None and self._window is None and self._probing is None))

    def set_memory_budget(self, budget_bytes: int) -> None:
        """A new budget for ``auto``: the next training forward plans against it."""
        self.budget_bytes = int(budget_bytes)
        self._plans.clear()
        self._warned_over_budget = False

    def close(self) -> None:
        self._window = None
        self._probing = None
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
            self._engine_checkpoints(index)
            return function(*args, **kwargs)
        # A new forward starts at the first layer we run (layer 0 unless an engine checkpoints it).
        if self._last_index is None or index <= self._last_index:
            self._begin_forward(function, args)
        self._last_index = index
        generation, decision = self.generation, self.decisions[index]
        if self._probing is not None:
            self._probe(index, function, args, kwargs)
        if decision == KEEP:
            out = function(*args, **kwargs)
        elif (self.one_node and not self.parameters[index].foreign
              and layer_checkpoint.usable(function, kwargs)):
            offload, watch = decision == OFFLOAD, self.parameters[index]
            out = layer_checkpoint.checkpoint_layer(function, args, watch.trainable(),
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
        if self._probing is not None and index == len(self.layers) - 1:
            self._finish_probe()
        return out

    def _begin_forward(self, function, args: tuple) -> None:
        self.generation += 1
        self._window = None       # a window whose backward never came
        if self._probing is not None:
            self._finish_probe()  # the last layer did not run (sliced layers, an exception): keep what was counted
        if not self.auto:
            self.decisions = self._static_decisions()
            return
        hidden = _hidden_states(function, args)
        tokens = int(hidden.shape[:-1].numel()) if hidden is not None and hidden.dim() > 0 else None
        device = hidden.device if hidden is not None else next(self.model.parameters()).device
        memory = self.counters(device)
        self.forward_base_bytes = memory.allocated(device) if memory is not None else None
        self._probing = None
        if self._needs_measurement(tokens, device):
            self.measurements += 1
            self.decisions = (RECOMPUTE,) * len(self.layers)
            self._probing, self._probe_tokens = [None] * len(self.layers), tokens
            self._open_window(device, tokens, None)
            return
        plan = self._plan_for(tokens, device)
        if self.plan is None or plan.decisions != self.plan.decisions:
            self._record_plan(plan, tokens, device)
        self.plan, self.decisions = plan, self._all_layers(plan.decisions)
        if (self.counters(device) is not None and plan.decisions not in self._verified
                and len(self._verified) < _MAX_VERIFICATIONS):
            self._verified.add(plan.decisions)
            self._open_window(device, tokens, plan)

    def _wants_backward_hook(self, index: int) -> bool:
        window = self._window
        if window is not None and window.generation == self.generation:
            return True                     # the first of these hooks to fire marks the backward's start
        return OFFLOAD in self.decisions[max(0, index - 1):index + 1]

    def _layer_backward_started(self, generation: int, index: int) -> None:
        # this layer's input (when the layer above did not already ask), then the next layer's
        self.offloader.prefetch(generation, index)
        if index > 0:
            self.offloader.prefetch(generation, index - 1)
        window = self._window
        if window is not None and window.generation == generation and not window.in_backward:
            if self._probing is not None:
                self._finish_probe()        # the forward is over even if its last layer did not run
            window.pause()                  # the forward (and loss) phase ends here
            window.in_backward = True
            window.resume()
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._close_window, window))

    # ---- auto: measuring ----------------------------------------------------------------------
    def _needs_measurement(self, tokens: Optional[int], device: torch.device) -> bool:
        if self.layer_memory is None:
            return True
        if self.measurements >= _MAX_MEASUREMENTS:
            return False
        if tokens is not None and self.measured_tokens and tokens > _REMEASURE_GROWTH * self.measured_tokens:
            return True
        if self.counters(device) is not None and self.forward_overhead is None:
            self._failed_measurements += 1
            return self._failed_measurements <= _MAX_FAILED_MEASUREMENTS
        return False

    def _probe(self, index: int, function, args: tuple, kwargs: dict) -> None:
        """Count the bytes autograd saves in this layer's forward when it is not checkpointed.

        Unique storages (a view costs nothing more than its base), without the layer's
        parameters and the tensors every layer shares (position embeddings, masks); the input
        only when the layer saves it. The pack hook gives autograd nothing back and keeps the
        tensor in a local dict until the count is done, so no freed block can be reused under a
        key already counted. Returning the tensor itself would tie every op that saves its own
        output (rsqrt, softmax, attention) into a cycle through the C++ graph that Python's gc
        cannot collect: the probe's activations would leak for good, on top of the step's peak.
        """
        hidden = _hidden_states(function, args)
        layer = self.layers[index]
        hidden_key = _storage_key(hidden) if hidden is not None else None
        shared = {_storage_key(t) for t in list(layer.parameters()) + list(layer.buffers())}
        shared |= {_storage_key(t) for t in tensors_in((args, kwargs, getattr(function, "args", ()),
                                                         getattr(function, "keywords", {})))}
        shared.discard(hidden_key)
        held = {}

        def count(t: torch.Tensor) -> None:
            key = _storage_key(t)
            if key not in shared:
                held.setdefault(key, t)
            return None

        window = self._window
        if window is not None:
            window.pause()
        device = hidden.device if hidden is not None else torch.device("cpu")
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), \
                torch.autograd.graph.saved_tensors_hooks(count, _never_unpacked):
            out = function(*args, **kwargs)
        saved_bytes = sum(_storage_bytes(t) for t in held.values())
        input_saved = hidden_key is not None and hidden_key in held
        del out, held
        if window is not None:
            window.resume()
        input_bytes = hidden.numel() * hidden.element_size() if hidden is not None else 0
        self._probing[index] = LayerMemory(saved_bytes, input_bytes, input_saved)

    def _finish_probe(self) -> None:
        probed, self._probing = self._probing, None
        known = [m for m in probed if m is not None]
        if not known:
            return
        fallback = max(known, key=lambda m: m.full_bytes)
        self.layer_memory = [m if m is not None else fallback for m in probed]
        self.measured_tokens = self._probe_tokens
        self._plans.clear()
        logger.info("sloth_plugins auto checkpointing measured, for %s tokens: %s", self._probe_tokens,
                    self.layer_memory)

    def counters(self, device: torch.device):
        if self.memory is not None:
            return self.memory
        return CudaMemory if device.type == "cuda" else None

    def _open_window(self, device: torch.device, tokens: Optional[int], plan: Optional[CheckpointPlan]) -> None:
        memory = self.counters(device)
        if memory is None:
            return
        self._window = _Window(self.generation, device, memory, tokens, self.decisions, self.forward_base_bytes, plan)
        self._window.resume()

    def _close_window(self, window: _Window) -> None:
        if window is not self._window:
            return
        backward_peak = window.memory.max_allocated(window.device)
        self._window = None
        if self.layer_memory is None:
            return
        ours = self.our_layers()
        layers = self._scaled(window.tokens)
        # an engine's layers cost the same whatever we plan: the overheads absorb them
        forward_act, backward_act = activation_peaks([layers[i] for i in ours], [window.decisions[i] for i in ours],
                                                     self._offload_min(window.device))
        scale = self._overhead_scale(window.tokens)
        forward_overhead = int((window.forward_peak - window.base - forward_act) / scale)
        backward_overhead = int((backward_peak - window.base - backward_act) / scale)
        # The largest seen: a step where gradients or optimizer state appear mid-step must not be forgotten.
        if self.forward_overhead is not None:
            forward_overhead = max(forward_overhead, self.forward_overhead)
            backward_overhead = max(backward_overhead, self.backward_overhead)
        self.forward_overhead, self.backward_overhead = forward_overhead, backward_overhead
        self._plans.clear()
        if window.plan is not None:
            self.measured_peak_bytes = max(window.forward_peak, backward_peak)
            self._update_note(window.plan, window.tokens, window.device)

    # ---- auto: planning -----------------------------------------------------------------------
    def _scaled(self, tokens: Optional[int]) -> List[LayerMemory]:
        if not tokens or not self.measured_tokens or tokens == self.measured_tokens:
            return list(self.layer_memory)
        # Linear in tokens: exact for the input and SDPA/flash attention, an overestimate for
        # eager attention's quadratic part (larger inputs than measured are measured again, up
        # to _MAX_MEASUREMENTS times).
        factor = tokens / self.measured_tokens
        return [m.scaled(factor) for m in self.layer_memory]

    def _offload_min(self, device: torch.device) -> int:
        return offload_min_bytes(device) if self.offloader.min_bytes is None else self.offloader.min_bytes

    def _overhead_scale(self, tokens: Optional[int]) -> float:
        # Overheads hold token-sized parts (logits, loss) and fixed ones (gradients): scaled up
        # with larger inputs than measured, never down, they err on the safe side.
        if not tokens or not self.measured_tokens:
            return 1.0
        return max(1.0, tokens / self.measured_tokens)

    def memory_model(self, device: torch.device, tokens: Optional[int] = None,
                     base_bytes: Optional[int] = None) -> MemoryModel:
        """The plan's memory model; base: ``base_bytes``, else what is allocated now (0 without counters)."""
        memory = self.counters(device)
        base = base_bytes if base_bytes is not None else memory.allocated(device) if memory is not None else 0
        scale = self._overhead_scale(tokens)
        return MemoryModel(base, int((self.forward_overhead or 0) * scale), int((self.backward_overhead or 0) * scale),
                           self._offload_min(device))

    def _plan_for(self, tokens: Optional[int], device: torch.device) -> CheckpointPlan:
        model = self.memory_model(device, tokens, self.forward_base_bytes)
        key = (tokens, model.base_bytes)
        plan = self._plans.get(key)
        if plan is None:
            layers = self._scaled(tokens)
            plan = plan_layers([layers[i] for i in self.our_layers()], self.budget_bytes, model)
            self._plans[key] = plan
            while len(self._plans) > 64:
                self._plans.popitem(last=False)
        if not plan.fits and not self._warned_over_budget:
            self._warned_over_budget = True
            warnings.warn(f"sloth_plugins gradient_checkpointing='auto': {plan.summary()}", RuntimeWarning,
                          stacklevel=2)
        return plan

    # ---- an engine's checkpoint around some layers ----------------------------------------------
    def our_layers(self) -> List[int]:
        """Indices of the layers we checkpoint (all but those an engine checkpoints); auto plans these."""
        return [i for i in range(len(self.layers)) if i not in self.engine_layers]

    def _all_layers(self, ours: Sequence[str]) -> Tuple[str, ...]:
        # an engine's layers are recomputed by the engine: that is what their activations cost
        decisions = [RECOMPUTE] * len(self.layers)
        for i, decision in zip(self.our_layers(), ours):
            decisions[i] = decision
        return tuple(decisions)

    def _engine_checkpoints(self, index: int) -> None:
        if index in self.engine_layers:
            return
        self.engine_layers.add(index)
        self._plans.clear()            # planned for layers that are no longer ours
        if index < len(self._entries):
            self._entries[index].detail = ENGINE_DETAIL
        n, k = len(self.layers), len(self.engine_layers)
        which = "every decoder layer" if k == n else f"{k} of {n} decoder layers"
        text = (f"gradient_checkpointing: the training engine already checkpoints {which} (its own "
                f"torch.utils.checkpoint around the layer: FSDP apply_activation_checkpointing, accelerate, "
                f"Lightning); sloth runs those plainly inside it: no second recompute, no offload")
        if self.auto:
            text += ("; auto has nothing left to plan" if k == n else f"; auto plans the other {n - k}")
        if self._engine_note_index is None:
            self.report.note(text)
            self._engine_note_index = len(self.report.notes) - 1
            logger.info("sloth_plugins: %s", text)
        else:
            self.report.notes[self._engine_note_index] = text

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
        self.measured_peak_bytes = None
        self._update_note(plan, tokens, device)
        logger.info("sloth_plugins gradient_checkpointing auto plan: %s", plan.summary())

    def _update_note(self, plan: CheckpointPlan, tokens: Optional[int], device: torch.device) -> None:
        text = f"gradient_checkpointing auto plan for {tokens} tokens: {plan.summary()}"
        if self.measured_peak_bytes is not None:
            text += f"; measured peak {self.measured_peak_bytes / GiB:.2f} GiB"
        elif self.counters(device) is None:
            text += " (activations only: no device memory counters on this device)"
        if self._note_index is None:
            self.report.note(text)
            self._note_index = len(self.report.notes) - 1
        else:
            self.report.notes[self._note_index] = text


CONTROLLER = StashKey[CheckpointController]()   # the checkpointing plugin's slot in the model's Stash
ENGINE_DETAIL = "checkpointed by the training engine: run plainly inside its checkpoint"
_TORCH_CHECKPOINT_FORWARD = ("torch.utils.checkpoint", "_checkpoint_hook.__init__.<locals>.pack_hook")
_TORCH_CHECKPOINT_RECOMPUTE = ("torch.utils.checkpoint", "_recomputation_hook.__init__.<locals>.pack_hook")


def engine_checkpoint_phase() -> Optional[str]:
    """Where the caller runs if inside someone else's activation checkpoint, else None.

    ``"forward"``: the forward of a non-reentrant ``torch.utils.checkpoint`` (FSDP's
    ``checkpoint_wrapper``, accelerate, Lightning, ``torch.distributed._composable.checkpoint``):
    its saved-tensors pack hook is on top of the stack. ``"recompute"``: its recompute (its
    recomputation hook on top), or a reentrant checkpoint's recompute, which runs the forward
    with grad enabled inside a backward pass and with no saved-tensors hooks of its own. The
    forward of a reentrant checkpoint runs under ``no_grad``, which needs no detection.

    Private torch API, isolated here: ``torch._C._autograd._top_saved_tensors_default_hooks``
    (torch >= 2.8), the qualified names of ``torch.utils.checkpoint``'s pack hooks, and
    ``torch._C._current_graph_task_id``; checked on torch 2.13 (CPU; the GPU tests check 2.11).
    Without them this answers None for both phases, which must agree: a plain forward under a
    non-reentrant checkpoint and a checkpointed recompute would save different tensors. None
    means we checkpoint a second time, as before. ``tests/test_checkpointing.py`` fails if the
    detection stops working on the installed torch.
    """
    try:
        top = torch._C._autograd._top_saved_tensors_default_hooks(True)
        in_backward = torch._C._current_graph_task_id() != -1
    except (AttributeError, TypeError, RuntimeError):
        return None
    if top is None:
        return "recompute" if in_backward else None
    pack = top[0]
    where = (getattr(pack, "__module__", None), getattr(pack, "__qualname__", None))
    if where == _TORCH_CHECKPOINT_FORWARD:
        return "forward"
    if where == _TORCH_CHECKPOINT_RECOMPUTE:
        return "recompute"
    return None


def _validated(plan: Optional[Sequence[str]], n: int) -> List[str]:
    plan = list(plan) if plan is not None else [FRAMEWORK] * n
    bad = sorted(set(plan) - set(PLAN_DECISIONS))
    if len(plan) != n or bad:
        raise ValueError(f"sloth_checkpoint_plan returned {plan!r}: need one of {', '.join(PLAN_DECISIONS)} "
                         f"for each of the {n} decoder layers")
    if AUTO in plan and set(plan) != {AUTO}:
        raise ValueError("sloth_checkpoint_plan: 'auto' must be given for every layer or none")
    return plan


def _on_backward_start(out: Any, callback) -> None:
    """Call ``callback()`` when the gradient of the layer's output arrives, i.e. its backward starts."""
    candidates = out if isinstance(out, (tuple, list)) else (out,)
    for t in candidates:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda grad: callback())
            return


def _hidden_states(function, args: tuple) -> Optional[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    hidden = getattr(function, "keywords", {}).get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):   # tensors without storage (subclasses, meta)
        return (t.device, id(t))


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def _never_unpacked(_):
    raise RuntimeError("sloth_plugins: the memory probe's forward has no backward")


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
