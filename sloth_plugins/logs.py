"""The ``sloth_plugins`` logger: what sloth announces (the PatchReport, auto's decisions) at INFO.

Python drops INFO records of a library logger unless the application configured logging, so
``show_info()`` (called by the adapters when ``verbose=True``) does what transformers does for
its own library logger: it sets the ``sloth_plugins`` logger to INFO when its level is unset and
adds a stderr handler that writes only while the application has configured no handler of its
own. Once it has (``logging.basicConfig(level=logging.INFO)``, Lightning's or Axolotl's setup),
records go to its handlers alone; ``logging.getLogger("sloth_plugins").setLevel(logging.WARNING)``
silences them.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("sloth_plugins")


class _UntilConfigured(logging.StreamHandler):
    """A stderr handler that steps aside once the root logger has a handler."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def show_info() -> None:
    """Make the ``sloth_plugins`` logger's INFO records visible by default (idempotent)."""
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(isinstance(h, _UntilConfigured) for h in logger.handlers):
        logger.addHandler(_UntilConfigured())


def is_rank_zero() -> bool:
    """Rank 0 of torch.distributed (or no process group): where decisions are announced."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
