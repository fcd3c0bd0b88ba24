"""Hugging Face Trainer / TRL adapter: ``Trainer(..., callbacks=[SlothCallback()])``.

Padding-free training: ``SlothCallback(padding_free=True)`` packs the default collator's padded
batches inside the model (``plugins/padding_free.py``); batches a collator already packed
(``integrations.collators.PaddingFreeCollator``, TRL's ``padding_free``) reach the model as they
are. An ``SFTConfig`` that makes TRL flatten its batches turns ``padding_free`` on by itself.

TRL's other trainers (DPO, KTO, GRPO, RLOO, Reward, Distillation, the experimental ones) compute
their own losses from per-token log-probs (TRL >= 1.16's fused LM head), full logits, hidden states
or a reward head's scores, never from the model's causal-LM loss: sloth's chunked loss is off for
them, the PatchReport notes which trainer computes the loss and how, and kernels, checkpointing and
padding-free still apply. A reference or teacher model the trainer holds is not patched.

The callback patches the Trainer's model when the Trainer finishes ``__init__`` (before any
wrapping, optimizer or dataloader) and re-asserts the patch when training begins, after the
Trainer has called ``gradient_checkpointing_enable()``. ``patch`` is idempotent, so the
second call leaves the same state a single one would.

Metrics: each training log (``on_log``, so every ``report_to`` tracker receives them) gets
``sloth/tokens_per_s`` (tokens the model's training forwards received since the previous log,
padding included, per second of wall time), ``sloth/peak_memory_gib`` (CUDA
``max_memory_allocated``; absent off CUDA), ``sloth/checkpoint_{kept,recomputed,offloaded}_layers``
(the checkpointing plan of the last training forward; absent with checkpointing off) and, on the
first log and whenever it changed, ``sloth/patch_report`` (the PatchReport as text); all of them also
go into ``trainer.state.log_history`` (``trainer_state.json``), so the report in force at each log
is reachable from the trainer. The Trainer
places its reporting callbacks before the user's and hands each the same dict in turn, so the
callback moves itself to the front of the Trainer's callback list.

``verbose=True`` logs the PatchReport once, on the main process, at INFO on the
``sloth_plugins`` logger, which it makes visible by default (``sloth_plugins.logs.show_info``).
``callback.report`` is the live report: the checkpointing plan and the loss revise it in place.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from ..config import SlothConfig, SlothConfigError
from ..logs import logger, show_info
from ..manager import patch
from ..models import resolve_causal_lm
from ..report import PatchReport

GiB = float(2 ** 30)


class SlothCallback(TrainerCallback):
    def __init__(self, config: Optional[SlothConfig] = None, *, verbose: bool = True, **options: Any):
        self.config = SlothConfig.resolve(config, "SlothCallback(config)", **options)
        self.verbose = verbose
        self.report: Optional[PatchReport] = None
        self._printed = False
        self._logged_report = ""              # the report text last added to the logs
        self._tokens, self._since, self._hook = 0, 0.0, None
        if verbose:
            show_info()

    def _patch(self, model, args) -> None:
        if model is None:
            raise RuntimeError("SlothCallback got no model from the Trainer: pass model=... to the Trainer")
        _refuse_clashes(model, args, self.config)
        config, note = self.config, None
        trainer = _trl_trainer(args)
        if trainer not in (None, "SFTTrainer") and config.loss != "off":
            config = config.replace(loss="off")
            note = _trl_loss_note(trainer, args)
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
        if trainer == "SFTTrainer" and _trl_has_fused_head():
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
        self._run_before_trackers()
        self._patch(model, args)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._run_before_trackers()      # also when added after the Trainer's __init__ (add_callback)
        self._patch(model, args)
        if self.verbose and not self._printed and state.is_world_process_zero:
            logger.info("%s", self.report)
            self._printed = True
        if self._hook is None:
            self._hook = model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        self._tokens, self._since = 0, time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or self.report is None:
            return          # eval logs and the final summary: no training interval to measure
        now, metrics = time.perf_counter(), {}
        if now > self._since:
            metrics["sloth/tokens_per_s"] = self._tokens / (now - self._since)
        self._tokens, self._since = 0, now
        device = next(model.parameters()).device if model is not None else None
        if device is not None and device.type == "cuda":
            metrics["sloth/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        from ..checkpointing import get_checkpoint_controller
        controller = get_checkpoint_controller(model) if model is not None else None
        if controller is not None:
            counts = Counter(controller.decisions)
            for decision, key in (("keep", "kept"), ("recompute", "recomputed"), ("offload", "offloaded")):
                metrics[f"sloth/checkpoint_{key}_layers"] = counts[decision]
        text = str(self.report)
        if text != self._logged_report:
            metrics["sloth/patch_report"] = self._logged_report = text
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)   # the Trainer recorded this log before on_log: trainer_state.json

    def _count_tokens(self, module, args, kwargs) -> None:
        if module.training and torch.is_grad_enabled():
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                self._tokens += ids.numel()
            elif isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
                self._tokens += kwargs["inputs_embeds"].shape[:-1].numel()

    def _run_before_trackers(self) -> None:
        """Move this callback to the front of the Trainer's callback list, ahead of the reporting
        callbacks (TensorBoard, W&B, ...) that read each log dict before the user's callbacks see
        it. No API hands a callback that list: it is the CallbackHandler calling this event."""
        frame = sys._getframe(1)
        for _ in range(4):
            if frame is None:
                return
            callbacks = getattr(frame.f_locals.get("self"), "callbacks", None)
            if isinstance(callbacks, list) and any(c is self for c in callbacks):
                callbacks[:] = [self] + [c for c in callbacks if c is not self]
                return
            frame = frame.f_back


def _refuse_clashes(model, args, config: SlothConfig) -> None:
    """Other options that patch the modules sloth patches: one error naming both (never two patches on one)."""
    # TRL's trainers turn Liger's fused loss off or compute their own losses (sloth's is off for all but SFTTrainer,
    # whose own fused LM head computes the loss)
    liger_loss = _trl_trainer(args) is None
    ours = [name for name, on in (("kernels", bool(config.enabled_kernels)),
                                  ("loss", liger_loss and config.loss != "off")) if on]
    if getattr(args, "use_liger_kernel", False) and ours:
        liger = "RMSNorm, RoPE, the gated MLP" + (" and the loss" if liger_loss else "")
        fix = "kernels=False, loss='off'" if liger_loss else "kernels=False"
        raise SlothConfigError(
            f"{type(args).__name__}(use_liger_kernel=True) and SlothCallback both patch the model (Liger replaces "
            f"{liger} when training starts, where sloth's {' and '.join(ours)} are): set use_liger_kernel=False, "
            f"or SlothCallback({fix}) to keep Liger's and use sloth for the rest (gradient checkpointing)")
    patched_by = _unsloth_patched(model)
    if patched_by:
        raise SlothConfigError(
            f"the model is already patched by Unsloth ({patched_by}.forward comes from Unsloth): Unsloth and "
            f"SlothCallback would both patch it; train it with Unsloth's own trainer, or load the model with "
            f"plain transformers to use SlothCallback")


def _unsloth_patched(model) -> Optional[str]:
    """The first module class whose forward Unsloth replaced (``FastLanguageModel`` rebinds the
    classes' forwards to functions of its own modules), or None."""
    try:
        lm = resolve_causal_lm(model)
    except TypeError:
        return None
    for cls in dict.fromkeys(type(m) for m in lm.modules()):
        module = getattr(getattr(cls, "forward", None), "__module__", None) or ""
        if module.split(".")[0] in ("unsloth", "unsloth_zoo"):
            return cls.__name__
    return None


def _trl_trainer(args) -> Optional[str]:
    """The TRL trainer an args object configures ("DPOTrainer" for a ``DPOConfig`` or a subclass of it), or None."""
    for cls in type(args).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if module.startswith("trl.") and cls.__name__.endswith("Config") and cls.__name__ != "TrainingArguments":
            return cls.__name__[:-len("Config")] + "Trainer"
    return None


def _trl_fused_head(args) -> bool:
    """Whether the TRL trainer of ``args`` (its module, TRL >= 1.16) computes its losses through
    ``add_fused_lm_head``, which it installs over the model's forward after the callbacks' ``on_init_end``."""
    for cls in type(args).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if module.startswith("trl.") and module.endswith("_config"):
            trainer_module = sys.modules.get(module[:-len("_config")] + "_trainer")
            return trainer_module is not None and hasattr(trainer_module, "add_fused_lm_head")
    return False


def _trl_loss_note(trainer: str, args) -> str:
    """What computes the loss under a TRL trainer other than SFTTrainer: never the model's causal-LM loss."""
    if trainer == "RewardTrainer":
        how = ("computes its pairwise loss from the sequence-classification head's scores (no language-model "
               "head, no causal-LM loss)")
    elif _trl_fused_head(args):
        how = ("computes its loss from the per-token log-probs of its own fused LM head (trl add_fused_lm_head, "
               "installed over the model's forward: no full logits); sloth's kernels and checkpointing run inside "
               "the backbone call of that head")
    else:
        how = ("computes its loss itself from the model's full logits or final hidden states (this TRL version has "
               "no fused LM head for it), never from the model's causal-LM loss")
    return f"TRL {trainer} {how}: sloth's chunked loss is off for this trainer"


def _trl_padding_free(args) -> bool:
    """What SFTTrainer decides (TRL 1.9 - 1.16): padding_free, or packing with a best-fit-decreasing strategy."""
    if _trl_trainer(args) != "SFTTrainer" or not hasattr(args, "packing_strategy"):
        return False
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
    if (_trl_trainer(args) != "SFTTrainer" or getattr(args, "use_liger_kernel", False)
            or _trl_has_fused_head()):
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
