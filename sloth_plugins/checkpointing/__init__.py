"""Smart gradient checkpointing, one module per concern.

* ``plan``: the memory model and the plan (pure functions), and ``AutoPlanner``, auto's plan phase.
* ``measure``: auto's measurements (the per-layer probe, the step's peak, the overheads).
* ``layer_node``: a decoder layer's checkpoint as one autograd node.
* ``offload``: parking checkpoint inputs in (pinned) host memory, fetching them back.
* ``engines``: detecting an engine's own checkpoint around a layer (FSDP, accelerate, Lightning).
* ``controller``: the run phase, ``CheckpointController.run_layer``, one controller per model.
* ``plugin``: the built-in ``CheckpointingPlugin`` (the hooks).

Public: ``get_checkpoint_controller(model)``, the controller of a patched model (or None).
"""
from __future__ import annotations

from .controller import CheckpointController, get_checkpoint_controller

__all__ = ["CheckpointController", "get_checkpoint_controller"]
