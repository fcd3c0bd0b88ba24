"""The gradient-checkpointing memory plan: pure functions from per-layer numbers to decisions,
and ``AutoPlanner``, the plan phase of ``auto`` (budget, plan cache, the plan in force).

Memory model (bytes on the device, one training step):

* ``keep``: a layer holds what autograd saved in its forward (``full_bytes``: unique storages,
  views counted once, parameters and tensors shared by all layers not at all) until its
  backward. Its input is among them only when the layer itself saves it (``input_saved``):
  a bf16 Llama layer saves an fp32 copy of it, not the input, which is freed as the forward
  moves on.
* ``recompute``: it holds only its input (``input_bytes``); its backward re-runs the forward,
  which briefly materialises the saved tensors again next to that input (``recompute_bytes``).
* ``offload``: its input waits in host memory, so it holds nothing; when the layer above
  starts its backward, the input is fetched back (prefetch), and then it behaves like
  ``recompute``. The last layer is never offloaded (its input would be fetched back at once).

Two moments can set the peak. The end of the forward (and the loss), where every layer's
resident bytes are alive; and the backward of layer j, where the layers below j are still
resident, layer j has its saved tensors materialised, and the input of layer j - 1 is being
prefetched if that layer is offloaded. Everything that does not depend on the plan (weights,
optimizer state, logits, gradients, workspaces) is ``base_bytes`` plus a per-phase overhead,
calibrated by measuring one step.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

KEEP, RECOMPUTE, OFFLOAD = "keep", "recompute", "offload"
DECISIONS = (KEEP, RECOMPUTE, OFFLOAD)
# what a ``sloth_checkpoint_plan`` hook may answer per layer (see hookspecs)
FRAMEWORK, AUTO = "framework", "auto"
PLAN_DECISIONS = (KEEP, RECOMPUTE, OFFLOAD, FRAMEWORK, AUTO)
GiB = float(2 ** 30)


@dataclass(frozen=True)
class LayerMemory:
    full_bytes: int            # held for backward when the layer keeps its activations
    input_bytes: int           # held when the layer is checkpointed: its input hidden states
    input_saved: bool = True   # full_bytes includes the input (the layer itself saves it)

    @property
    def recompute_bytes(self) -> int:
        """Held during a checkpointed layer's backward: the recomputed saved tensors and its input."""
        return self.full_bytes if self.input_saved else self.full_bytes + self.input_bytes

    def scaled(self, factor: float) -> "LayerMemory":
        return LayerMemory(int(round(self.full_bytes * factor)), int(round(self.input_bytes * factor)),
                           self.input_saved)


@dataclass(frozen=True)
class MemoryModel:
    base_bytes: int = 0          # allocated when the forward starts: weights, optimizer state, ...
    forward_overhead: int = 0    # non-layer bytes at the forward / loss peak (embeddings, logits, loss)
    backward_overhead: int = 0   # non-layer bytes during the layers' backward (gradients, temporaries)
    offload_min_bytes: int = 0   # inputs smaller than this are not worth a host round trip


@dataclass(frozen=True)
class CheckpointPlan:
    decisions: Tuple[str, ...]
    predicted_peak_bytes: int
    budget_bytes: int
    fits: bool

    def counts(self) -> Dict[str, int]:
        return {d: self.decisions.count(d) for d in DECISIONS}

    def summary(self) -> str:
        c = self.counts()
        text = (f"{c[KEEP]} keep, {c[RECOMPUTE]} recompute, {c[OFFLOAD]} offload; predicted peak "
                f"{self.predicted_peak_bytes / GiB:.2f} GiB of a {self.budget_bytes / GiB:.2f} GiB budget")
        return text if self.fits else text + " (over budget: nothing left that would lower the peak)"


def is_offloaded(layer: LayerMemory, decision: str, offload_min_bytes: int) -> bool:
    return decision == OFFLOAD and layer.input_bytes >= offload_min_bytes


def resident_bytes(layer: LayerMemory, decision: str, offload_min_bytes: int = 0) -> int:
    """Device bytes a layer holds between its forward and its backward."""
    if decision == KEEP:
        return layer.full_bytes
    if is_offloaded(layer, decision, offload_min_bytes):
        return 0
    return layer.input_bytes


def activation_peaks(layers: Sequence[LayerMemory], decisions: Sequence[str],
                     offload_min_bytes: int = 0) -> Tuple[int, int]:
    """(forward-end peak, backward peak) of the decoder layers' activations alone."""
    _check(layers, decisions)
    forward = sum(resident_bytes(m, d, offload_min_bytes) for m, d in zip(layers, decisions))
    backward, below, prefetched = 0, 0, 0
    for m, d in zip(layers, decisions):
        materialised = m.full_bytes if d == KEEP else m.recompute_bytes
        backward = max(backward, below + materialised + prefetched)
        below += resident_bytes(m, d, offload_min_bytes)
        prefetched = m.input_bytes if is_offloaded(m, d, offload_min_bytes) else 0
    return forward, backward


def predict_peak(layers: Sequence[LayerMemory], decisions: Sequence[str], model: MemoryModel = MemoryModel()) -> int:
    forward, backward = activation_peaks(layers, decisions, model.offload_min_bytes)
    return model.base_bytes + max(model.forward_overhead + forward, model.backward_overhead + backward)


def plan_layers(layers: Sequence[LayerMemory], budget_bytes: int, model: MemoryModel = MemoryModel(),
                allow_offload: bool = True) -> CheckpointPlan:
    """Per layer keep / recompute / offload: the least recompute and offload that fits the budget.

    Greedy on the exact peak: keep everything; while over budget, recompute the layers that
    free the most (earliest first among equals, the last layer last, since its activations
    are materialised at the start of the backward anyway); then offload recomputed layers,
    earliest first, never the last one. A change that does not lower the peak is not made.
    """
    n = len(layers)
    decisions: List[str] = [KEEP] * n

    def peak() -> int:
        return predict_peak(layers, decisions, model)

    current = peak()
    if current > budget_bytes:
        order = sorted(range(n - 1), key=lambda i: (-(layers[i].full_bytes - layers[i].input_bytes), i))
        current = _convert(decisions, order + [n - 1] if n else [], RECOMPUTE, peak, current, budget_bytes)
    if current > budget_bytes and allow_offload:
        order = [i for i in range(n - 1) if layers[i].input_bytes >= model.offload_min_bytes]
        current = _convert(decisions, order, OFFLOAD, peak, current, budget_bytes)
    return CheckpointPlan(tuple(decisions), current, int(budget_bytes), current <= budget_bytes)


def _convert(decisions: List[str], order: Sequence[int], to: str, peak, current: int, budget: int) -> int:
    for i in order:
        if current <= budget:
            break
        before = decisions[i]
        decisions[i] = to
        lowered = peak()
        if lowered < current:
            current = lowered
        else:
            decisions[i] = before
    return current


def _check(layers: Sequence[LayerMemory], decisions: Sequence[str]) -> None:
    if len(layers) != len(decisions):
        raise ValueError(f"{len(decisions)} decisions for {len(layers)} layers")
    bad = sorted(set(decisions) - set(DECISIONS))
    if bad:
        raise ValueError(f"unknown checkpoint decision(s) {bad}; valid: {', '.join(DECISIONS)}")


# ------------------------------------------------------------------------------------------------
# auto's plan phase

_MAX_VERIFICATIONS = 4        # steps whose peak auto measures to check a new plan (each resets CUDA peak stats)
_MAX_PLANS = 64               # plans cached per (tokens, base bytes)


class AutoPlanner:
    """The budget ``auto`` plans against, the plans made for it (per token count and base memory)
    and the plan in force."""

    def __init__(self, budget_bytes: Optional[int]):
        self.budget_bytes = budget_bytes
        self.plan: Optional[CheckpointPlan] = None
        self._plans: "OrderedDict[tuple, CheckpointPlan]" = OrderedDict()
        self._verified: set = set()
        self._warned_over_budget = False

    def forget(self) -> None:
        """The numbers the cached plans were made from changed."""
        self._plans.clear()

    def set_budget(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._plans.clear()
        self._warned_over_budget = False

    def plan_for(self, tokens: Optional[int], model: MemoryModel,
                 layers: Callable[[], Sequence[LayerMemory]]) -> CheckpointPlan:
        """The plan for ``tokens`` under ``model``; ``layers()`` gives the planned layers' numbers."""
        key = (tokens, model.base_bytes)
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_layers(layers(), self.budget_bytes, model)
            self._plans[key] = plan
            while len(self._plans) > _MAX_PLANS:
                self._plans.popitem(last=False)
        if not plan.fits and not self._warned_over_budget:
            self._warned_over_budget = True
            warnings.warn(f"sloth_plugins gradient_checkpointing='auto': {plan.summary()}", RuntimeWarning,
                          stacklevel=3)
        return plan

    def should_verify(self, plan: CheckpointPlan) -> bool:
        """Whether to measure the peak of a step under ``plan`` (each new plan, a few times in all)."""
        if plan.decisions in self._verified or len(self._verified) >= _MAX_VERIFICATIONS:
            return False
        self._verified.add(plan.decisions)
        return True
