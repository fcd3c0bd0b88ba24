"""``auto``'s measurements: what each layer's activations cost, and what the plan does not control.

The first training forward recomputes every layer and counts, per layer, the bytes autograd
would save without checkpointing (a probe forward under a counting ``saved_tensors_hooks``, RNG
forked so dropout is untouched). On CUDA (or with substitute counters) a measuring window
around a forward and its backward reads the allocator's peak of each phase; what the layers'
activations do not explain is the step's overhead (weights' gradients, logits, loss,
workspaces), which scales the plan's memory model. Larger inputs than the measured ones are
measured again, up to ``_MAX_MEASUREMENTS`` times.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .layer_node import outputs_not_recorded, tensors_in
from .offload import ActivationOffloader, offload_min_bytes
from .plan import CheckpointPlan, LayerMemory, MemoryModel, activation_peaks

logger = logging.getLogger("sloth_plugins")

_MAX_FAILED_MEASUREMENTS = 3  # measuring forwards without a backward before auto stops waiting for one
_MAX_MEASUREMENTS = 8         # probing costs a second forward of every layer: beyond this, scale up instead
_REMEASURE_GROWTH = 1.1       # inputs this much larger than the measured ones are measured again


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
class Window:
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


class MemoryMeter:
    """Per patched model: the per-layer probe, the measuring windows and what they found."""

    def __init__(self, layers: Sequence[torch.nn.Module], offloader: ActivationOffloader):
        self.layers, self.offloader = list(layers), offloader
        self.memory = None            # None: CudaMemory on CUDA devices, no counters elsewhere
        self.layer_memory: Optional[List[LayerMemory]] = None
        self.measured_tokens: Optional[int] = None
        self.forward_overhead: Optional[int] = None
        self.backward_overhead: Optional[int] = None
        self.measured_peak_bytes: Optional[int] = None
        self.forward_base_bytes: Optional[int] = None     # allocated when the last training forward's layers began
        self.measurements = 0
        self._failed_measurements = 0
        self.probing: Optional[List[Optional[LayerMemory]]] = None
        self._probe_tokens: Optional[int] = None
        self.window: Optional[Window] = None

    def counters(self, device: torch.device):
        if self.memory is not None:
            return self.memory
        return CudaMemory if device.type == "cuda" else None

    def clear(self) -> None:
        self.window = None
        self.probing = None

    # ---- when to measure ----------------------------------------------------------------------
    def begin_forward(self, device: torch.device) -> None:
        """A training forward starts: what is allocated now is its base."""
        memory = self.counters(device)
        self.forward_base_bytes = memory.allocated(device) if memory is not None else None
        self.probing = None

    def needs_measurement(self, tokens: Optional[int], device: torch.device) -> bool:
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

    def start(self, generation: int, device: torch.device, tokens: Optional[int],
              decisions: Tuple[str, ...]) -> None:
        """This forward (running ``decisions``, every layer recomputed) is measured: probe each layer."""
        self.measurements += 1
        self.probing, self._probe_tokens = [None] * len(self.layers), tokens
        self.open_window(generation, device, tokens, decisions, None)

    # ---- the probe ----------------------------------------------------------------------------
    def probe(self, index: int, function, args: tuple, kwargs: dict) -> None:
        """Count the bytes autograd saves in this layer's forward when it is not checkpointed.

        Unique storages (a view costs nothing more than its base), without the layer's
        parameters and the tensors every layer shares (position embeddings, masks); the input
        only when the layer saves it. The pack hook gives autograd nothing back and keeps the
        tensor in a local dict until the count is done, so no freed block can be reused under a
        key already counted. Returning the tensor itself would tie every op that saves its own
        output (rsqrt, softmax, attention) into a cycle through the C++ graph that Python's gc
        cannot collect: the probe's activations would leak for good, on top of the step's peak.
        """
        hidden = hidden_states(function, args)
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

        window = self.window
        if window is not None:
            window.pause()
        device = hidden.device if hidden is not None else torch.device("cpu")
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), outputs_not_recorded(), \
                torch.autograd.graph.saved_tensors_hooks(count, _never_unpacked):
            out = function(*args, **kwargs)
        saved_bytes = sum(_storage_bytes(t) for t in held.values())
        input_saved = hidden_key is not None and hidden_key in held
        del out
        held.clear()      # the closure keeps the dict: empty it to release the tensors
        if window is not None:
            window.resume()
        input_bytes = hidden.numel() * hidden.element_size() if hidden is not None else 0
        self.probing[index] = LayerMemory(saved_bytes, input_bytes, input_saved)

    def finish_probe(self) -> bool:
        """The measured forward is over. True when it gave new per-layer numbers (plans are stale)."""
        probed, self.probing = self.probing, None
        known = [m for m in probed if m is not None]
        if not known:
            return False
        fallback = max(known, key=lambda m: m.full_bytes)
        self.layer_memory = [m if m is not None else fallback for m in probed]
        self.measured_tokens = self._probe_tokens
        logger.info("sloth_plugins auto checkpointing measured, for %s tokens: %s", self._probe_tokens,
                    self.layer_memory)
        return True

    # ---- the peak of a step -------------------------------------------------------------------
    def open_window(self, generation: int, device: torch.device, tokens: Optional[int],
                    decisions: Tuple[str, ...], plan: Optional[CheckpointPlan]) -> None:
        memory = self.counters(device)
        if memory is None:
            return
        self.window = Window(generation, device, memory, tokens, decisions, self.forward_base_bytes, plan)
        self.window.resume()

    def close_window(self, window: Window, ours: Sequence[int]) -> bool:
        """The step's backward is over: calibrate the overheads from its peaks. ``ours``: the layers
        we checkpoint (an engine's layers cost the same whatever we plan: the overheads absorb
        them). True when the overheads were updated (plans are stale)."""
        if window is not self.window:
            return False
        backward_peak = window.memory.max_allocated(window.device)
        self.window = None
        if self.layer_memory is None:
            return False
        layers = self.scaled(window.tokens)
        forward_act, backward_act = activation_peaks([layers[i] for i in ours], [window.decisions[i] for i in ours],
                                                     self.offload_min(window.device))
        scale = self.overhead_scale(window.tokens)
        forward_overhead = int((window.forward_peak - window.base - forward_act) / scale)
        backward_overhead = int((backward_peak - window.base - backward_act) / scale)
        # The largest seen: a step where gradients or optimizer state appear mid-step must not be forgotten.
        if self.forward_overhead is not None:
            forward_overhead = max(forward_overhead, self.forward_overhead)
            backward_overhead = max(backward_overhead, self.backward_overhead)
        self.forward_overhead, self.backward_overhead = forward_overhead, backward_overhead
        if window.plan is not None:
            self.measured_peak_bytes = max(window.forward_peak, backward_peak)
        return True

    # ---- the numbers the plan uses --------------------------------------------------------------
    def scaled(self, tokens: Optional[int]) -> List[LayerMemory]:
        if not tokens or not self.measured_tokens or tokens == self.measured_tokens:
            return list(self.layer_memory)
        # Linear in tokens: exact for the input and SDPA/flash attention, an overestimate for
        # eager attention's quadratic part (larger inputs than measured are measured again, up
        # to _MAX_MEASUREMENTS times).
        factor = tokens / self.measured_tokens
        return [m.scaled(factor) for m in self.layer_memory]

    def offload_min(self, device: torch.device) -> int:
        return offload_min_bytes(device) if self.offloader.min_bytes is None else self.offloader.min_bytes

    def overhead_scale(self, tokens: Optional[int]) -> float:
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
        scale = self.overhead_scale(tokens)
        return MemoryModel(base, int((self.forward_overhead or 0) * scale), int((self.backward_overhead or 0) * scale),
                           self.offload_min(device))


def hidden_states(function, args: tuple) -> Optional[torch.Tensor]:
    """The layer's input: its first tensor argument, or the ``hidden_states`` a partial binds."""
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
