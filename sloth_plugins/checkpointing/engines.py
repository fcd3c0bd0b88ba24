"""An engine's own checkpoint around a decoder layer: detecting it, and the layers it owns.

An engine that already checkpoints a decoder layer (FSDP's ``apply_activation_checkpointing`` /
``checkpoint_wrapper``, accelerate's, Lightning's and DeepSpeed's activation checkpointing,
reentrant or not) has it run plainly by ``CheckpointController.run_layer``: no second recompute, no offload,
no probe. Those layers are named in the report once, and ``auto`` plans the others.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import torch

from ..report import PatchReport

logger = logging.getLogger("sloth_plugins")

ENGINE_DETAIL = "checkpointed by the training engine: run plainly inside its checkpoint"
_TORCH_CHECKPOINT_FORWARD = ("torch.utils.checkpoint", "_checkpoint_hook.__init__.<locals>.pack_hook")
_TORCH_CHECKPOINT_RECOMPUTE = ("torch.utils.checkpoint", "_recomputation_hook.__init__.<locals>.pack_hook")
# DeepSpeed's activation checkpointing: ``deepspeed.checkpointing.checkpoint`` is reentrant (nothing
# to recognise); its ``non_reentrant_checkpoint`` installs saved-tensors hooks of its own.
_DS_CHECKPOINTING = "deepspeed.runtime.activation_checkpointing.checkpointing"
_FORWARD_PACK_HOOKS = {_TORCH_CHECKPOINT_FORWARD,
                       (_DS_CHECKPOINTING, "non_reentrant_checkpoint.<locals>.checkpoint_pack")}
_RECOMPUTE_PACK_HOOKS = {
    _TORCH_CHECKPOINT_RECOMPUTE,
    (_DS_CHECKPOINTING, "non_reentrant_checkpoint.<locals>.checkpoint_unpack.<locals>.replay_pack")}


def engine_checkpoint_phase() -> Optional[str]:
    """Where the caller runs if inside someone else's activation checkpoint, else None.

    ``"forward"``: the forward of a non-reentrant ``torch.utils.checkpoint`` (FSDP's
    ``checkpoint_wrapper``, accelerate, Lightning, ``torch.distributed._composable.checkpoint``) or
    of DeepSpeed's ``non_reentrant_checkpoint``: its saved-tensors pack hook is on top of the stack.
    ``"recompute"``: its recompute (its recomputation hook on top), or a reentrant checkpoint's
    recompute, which runs the forward with grad enabled inside a backward pass and with no
    saved-tensors hooks of its own. The forward of a reentrant checkpoint (DeepSpeed's
    ``deepspeed.checkpointing.checkpoint`` too) runs under ``no_grad``, which needs no detection.

    Private torch API, isolated here: ``torch._C._autograd._top_saved_tensors_default_hooks``
    (torch >= 2.8), the qualified names of ``torch.utils.checkpoint``'s pack hooks, and
    ``torch._C._current_graph_task_id``; checked on torch 2.13 (CPU; the GPU tests check 2.11).
    Without them this answers None for both phases, which must agree: a plain forward under a
    non-reentrant checkpoint and a checkpointed recompute would save different tensors. None
    means we checkpoint a second time, as before. ``tests/checkpointing/test_engines.py`` fails
    if the detection stops working on the installed torch.
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
    if where in _FORWARD_PACK_HOOKS:
        return "forward"
    if where in _RECOMPUTE_PACK_HOOKS:
        return "recompute"
    return None


class EngineLayers:
    """The decoder layers an engine's own checkpoint runs (we run them plainly), and the report's note."""

    def __init__(self, n_layers: int, report: PatchReport, auto: bool):
        self.n_layers, self.report, self.auto = n_layers, report, auto
        self.indices: set = set()
        self._note_index: Optional[int] = None

    def ours(self) -> List[int]:
        """Indices of the layers we checkpoint (all but those an engine checkpoints)."""
        return [i for i in range(self.n_layers) if i not in self.indices]

    def all(self) -> bool:
        return len(self.indices) == self.n_layers

    def add(self, index: int, entries: Sequence) -> bool:
        """Layer ``index`` runs inside an engine's checkpoint. True when that is news (plans made
        for the layers we had are out of date); ``entries``: the report's line per layer."""
        if index in self.indices:
            return False
        self.indices.add(index)
        if index < len(entries):
            entries[index].detail = ENGINE_DETAIL
        n, k = self.n_layers, len(self.indices)
        which = "every decoder layer" if k == n else f"{k} of {n} decoder layers"
        text = (f"gradient_checkpointing: the training engine already checkpoints {which} (its own "
                f"checkpoint around the layer: FSDP apply_activation_checkpointing, accelerate, Lightning, "
                f"DeepSpeed activation checkpointing); sloth runs those plainly inside it: no second recompute, "
                f"no offload")
        if self.auto:
            text += ("; auto has nothing left to plan" if k == n else f"; auto plans the other {n - k}")
        if self._note_index is None:
            self.report.note(text)
            self._note_index = len(self.report.notes) - 1
            logger.info("sloth_plugins: %s", text)
        else:
            self.report.notes[self._note_index] = text
        return True
