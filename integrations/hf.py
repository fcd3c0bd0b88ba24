"""Hugging Face Trainer / TRL adapter: ``Trainer(..., callbacks=[SlothCallback()])``.

Padding-free training: ``SlothCallback(padding_free=True)`` packs the default collator's padded
batches inside the model (``plugins/padding_free.py``); batches a collator already packed
(``integrations.collators.PaddingFreeCollator``, TRL's ``padding_free``) reach the model as they
are. An ``SFTConfig`` that makes TRL flatten its batches turns ``padding_free`` on by itself.

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
        self.config = SlothConfig.resolve(config, "SlothCallback(config)", **options)
        self.verbose = verbose
        self.report: Optional[PatchReport] = None
        self._printed = False

    def _patch(self, model, args) -> None:
        if model is None:
            raise RuntimeError("SlothCallback got no model from the Trainer: pass model=... to the Trainer")
        config, note = self.config, None
        if _trl_reads_full_logits(model, args) and config.loss != "off":
            config = config.replace(loss="off")
            note = (f"TRL SFTTrainer with loss_type={args.loss_type!r} computes its token metrics from the full "
                    f"logits, so sloth's chunked loss is off for this trainer; use loss_type='chunked_nll' (or TRL "
                    f">= 1.16) for a loss without full logits")
        notes = [note] if note else []
        if getattr(args, "label_smoothing_factor", 0) > 0 and config.loss != "off":
            # The Trainer pops the labels and smooths the loss from the full logits itself.
            config = config.replace(loss="off")
            notes.append(f"label_smoothing_factor={args.label_smoothing_factor:g}: the Trainer computes the "
                         f"label-smoothed loss from the full logits, so sloth's fused loss is off for this trainer")
        if hasattr(args, "loss_type") and _trl_has_fused_head():
            notes.append("TRL SFTTrainer (>= 1.16) computes the training loss with its own fused LM head "
                         "(trl add_fused_lm_head: no full logits), which it installs over the model's forward "
                         "after this callback patched it; sloth's chunked loss serves the other forward calls")
        if _trl_padding_free(args) and not config.padding_free:
            config = config.replace(padding_free=True)
            notes.append("TRL SFTTrainer flattens each batch into one row itself (padding_free, or packing with "
                         "the bfd strategy): padding_free is on, its packed batches reach the model as they are")
        self.report = patch(model, config)
        for text in notes:
            if text not in self.report.notes:
                self.report.note(text)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._patch(model, args)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._patch(model, args)
        if self.verbose and not self._printed and state.is_world_process_zero:
            print(self.report)
            self._printed = True


def _trl_padding_free(args) -> bool:
    """What SFTTrainer decides (TRL 1.9 - 1.16): padding_free, or packing with a best-fit-decreasing strategy."""
    if not hasattr(args, "packing_strategy"):
        return False    # not an SFTConfig
    return bool(getattr(args, "padding_free", False)
                or (getattr(args, "packing", False) and args.packing_strategy in ("bfd", "bfd_split")))


def _trl_has_fused_head() -> bool:
    """TRL >= 1.16: SFTTrainer installs ``add_fused_lm_head`` at the end of its ``__init__`` (after the
    callbacks' ``on_init_end``) and trains through it, so it never reads full logits."""
    import sys
    module = sys.modules.get("trl.trainer.sft_trainer")
    return module is not None and hasattr(module, "add_fused_lm_head")


def _trl_reads_full_logits(model, args) -> bool:
    """SFTTrainer (TRL < 1.16, loss_type 'nll'/'dft', no Liger) reads ``outputs.logits`` after the loss."""
    if not hasattr(args, "loss_type") or getattr(args, "use_liger_kernel", False) or _trl_has_fused_head():
        return False
    from ..instance_patch import has_instance_override
    from ..manager import get_state
    from ..models import resolve_causal_lm
    lm = resolve_causal_lm(model)
    state = get_state(lm)
    if has_instance_override(lm) and state is None:
        return False   # TRL installed its own chunked head: it does not read logits
    if state is not None and state.report.count("loss", patched=False):
        return False   # an earlier pass found TRL's head already in charge
    return args.loss_type in ("nll", "dft")
