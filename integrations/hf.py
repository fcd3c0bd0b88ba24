"""Hugging Face Trainer / TRL adapter: ``Trainer(..., callbacks=[SlothCallback()])``.

The callback patches the Trainer's model when the Trainer finishes ``__init__`` (before any
wrapping, optimizer or dataloader) and re-asserts the patch when training begins, after the
Trainer has called ``gradient_checkpointing_enable()``. ``patch`` is idempotent, so the
second call leaves the same state a single one would.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from transformers import TrainerCallback

from ..config import SlothConfig
from ..manager import patch
from ..report import PatchReport

logger = logging.getLogger("sloth_plugins")


class SlothCallback(TrainerCallback):
    def __init__(self, config: Optional[SlothConfig] = None, *, verbose: bool = True, **options: Any):
        if config is not None and options:
            config = config.replace(**options)
        self.config = config if config is not None else SlothConfig(**options)
        self.verbose = verbose
        self.report: Optional[PatchReport] = None
        self._printed = False

    def _patch(self, model) -> None:
        if model is None:
            raise RuntimeError("SlothCallback got no model from the Trainer: pass model=... to the Trainer")
        self.report = patch(model, self.config)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._patch(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._patch(model)
        if self.verbose and not self._printed and state.is_world_process_zero:
            print(self.report)
            self._printed = True
