"""Axolotl adapter: one line in the config.

    plugins:
      - sloth_plugins.integrations.axolotl.SlothPlugin
    sloth_kernels: true
    sloth_loss: chunked
    sloth_gradient_checkpointing: auto      # auto | offload | recompute | off
    sloth_padding_free: true                # unset: follows sample_packing
    sloth_rope: false                       # per-kernel switches, as Liger's liger_rope (axolotl_args)

Every key, and which Axolotl option meets which sloth key: ``integrations/README.md``.

Hooks, in Axolotl's order:
* ``register`` (raw config, before validation): Axolotl auto-enables its own LoRA kernels
  (``lora_mlp_kernel``/``lora_qkv_kernel``/``lora_o_kernel``) when they are unset; they patch the
  MLP and attention forwards sloth's kernels patch, so unset ones are set to false here and
  sloth takes those modules over. Keys the user set explicitly are left alone: validation
  (``axolotl_args``) then refuses a clash, naming the key to change.
* ``post_model_load``: after the adapter is attached and after Axolotl's own post-load patches,
  ``sloth_plugins.patch`` the model (idempotent) and log the PatchReport, and, where
  ``sample_packing`` without a sample-isolating attention makes the loss curve differ from
  plain Axolotl's, one line that says so. Modules someone else
  already replaced on the instance fall back (the report says so): never two patches on one.
  With ``sloth_padding_free`` (on by itself with ``sample_packing``), padded batches are trained
  as one packed row; Axolotl's packed batches reach the model as they are, and its mask of
  sample indices (kept when the attention cannot isolate packed samples) is split into samples.
  With ``rl:`` (dpo, ipo, kto, orpo, simpo, grpo, ...) Axolotl trains with a TRL trainer that
  computes its own loss: sloth's chunked loss is off (the report says so and, through
  ``SlothCallback``, names the TRL trainer); kernels, fused LoRA and checkpointing apply.
* sloth's own INFO announcements (``auto`` keeping every layer although checkpointing is on,
  offloading) reach Axolotl's console through the plugin's logger (``_ThroughAxolotl``).
* ``add_callbacks_post_trainer``: ``SlothCallback`` re-asserts the patch when training begins.
* ``post_train`` (Axolotl calls it twice): writes ``sloth_report.json`` to ``output_dir``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, List, Optional

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from ..config import SlothConfig, SlothConfigError
from ..logs import logger
from ..manager import get_state, patch
from ..report import PatchReport
from .axolotl_args import LORA_KERNEL_OWNERS, conflicts, kernels_option, sloth_config_from

LOG = get_logger("axolotl.integrations.sloth")   # Axolotl's handlers, main process only
REPORT_FILE = "sloth_report.json"


class _ThroughAxolotl(logging.Handler):
    """Re-logs the ``sloth_plugins`` logger's INFO records (auto's decisions, its measurement)
    through the plugin's Axolotl logger. Axolotl's console shows INFO only from ``axolotl.*``
    loggers (its ``AxolotlOrWarnErrorFilter``, on the handlers and on every logger created after
    ``configure_logging``, ours included), so these would be dropped; warnings already pass."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            LOG.log(record.levelno, "%s", record.getMessage(), main_process_only=False)   # sloth picks rank 0


def _route_sloth_logs() -> None:
    """Make sloth's announcements visible in an Axolotl run (idempotent)."""
    sloth_logger = logging.getLogger(logger.name)
    sloth_logger.filters = [f for f in sloth_logger.filters if type(f).__name__ != "AxolotlOrWarnErrorFilter"]
    if sloth_logger.level == logging.NOTSET:
        sloth_logger.setLevel(logging.INFO)
    if not any(isinstance(h, _ThroughAxolotl) for h in sloth_logger.handlers):
        sloth_logger.addHandler(_ThroughAxolotl())


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def _packing_note(cfg, config: SlothConfig) -> Optional[str]:
    if not (config.padding_free and cfg.get("sample_packing")):
        return None
    attention = cfg.get("attn_implementation")
    if cfg.get("attn_decontaminates_packing"):
        how = (f"drops the attention mask and {attention or 'the model'} attention keeps the samples apart from the "
               f"position ids")
    else:
        how = ("keeps its mask of sample indices (attn_implementation does not isolate packed samples), which "
               "sloth's padding-free forward splits into samples")
    return f"padding_free follows sample_packing: Axolotl packs the rows (position ids restarting per sample) and {how}"


def _rl_loss_note(cfg) -> Optional[str]:
    """``rl: dpo``/``kto``/``grpo``/...: Axolotl builds a TRL preference/RL trainer (its ``Axolotl*Trainer``
    subclasses), which computes its own loss from log-probs, logits or hidden states, never from the model's
    causal-LM loss; SlothCallback then names that TRL trainer (``integrations.hf``)."""
    rl = cfg.get("rl")
    if not rl:
        return None
    rl = getattr(rl, "value", rl)
    return (f"Axolotl rl: {rl} trains with its TRL-based trainer, which computes its own loss: sloth's chunked loss "
            f"is off; kernels, fused LoRA and checkpointing apply")


def _loss_curve_note(cfg, config: SlothConfig) -> Optional[str]:
    """Where the plugin's loss curve differs from plain Axolotl's on purpose: packed rows whose
    attention does not keep the samples apart (``attn_implementation`` unset or one that cannot)."""
    if not (config.padding_free and cfg.get("sample_packing")) or cfg.get("attn_decontaminates_packing"):
        return None
    attention = cfg.get("attn_implementation")
    which = f"attn_implementation: {attention}" if attention else "no attn_implementation"
    return (f"sample_packing with {which}: sloth's padding-free forward keeps the packed samples apart (each attends "
            f"only to itself), which plain Axolotl does not here (its samples in one row attend to each other), so "
            f"the loss curve differs from the same config without the plugin. Set attn_implementation: sdpa (or "
            f"flash_attention_2) for the same isolation in both, or sloth_padding_free: false for Axolotl's "
            f"behaviour")


class SlothPlugin(BasePlugin):
    def __init__(self):
        super().__init__()
        self.config: Optional[SlothConfig] = None
        self.report: Optional[PatchReport] = None
        self.taken_over: List[str] = []
        self._logged = False

    def get_input_args(self) -> str:
        return "sloth_plugins.integrations.axolotl_args.SlothArgs"

    def register(self, cfg: dict) -> None:
        # The plugin instance lives as long as the process (Axolotl's PluginManager is a
        # singleton): start each config afresh.
        self.config, self.report, self.taken_over, self._logged = None, None, [], False
        _route_sloth_logs()
        try:
            value = kernels_option(cfg)
            kernels = set(SlothConfig(kernels=True if value is None else value).enabled_kernels)
        except (SlothConfigError, ValueError):
            return  # validation reports the bad value
        for key, owners in LORA_KERNEL_OWNERS.items():
            if kernels & set(owners) and cfg.get(key) is None:
                cfg[key] = False
                self.taken_over.append(key)
        if self.taken_over:
            LOG.info("sloth_plugins takes over the modules of %s (set to false; set a key to true explicitly "
                     "to keep Axolotl's kernel and drop the matching sloth_kernels instead)",
                     ", ".join(self.taken_over))

    def pre_model_load(self, cfg) -> None:
        self.config = sloth_config_from(cfg)
        # Validation already checked this; a config that skipped it must not slip through.
        problems = conflicts(lambda key: cfg.get(key), self.config)
        if problems:
            raise ValueError("SlothPlugin and other options would patch the same modules:\n- "
                             + "\n- ".join(problems))

    def post_model_load(self, cfg, model) -> None:
        if self.config is None:
            self.config = sloth_config_from(cfg)
        rl_note = _rl_loss_note(cfg)
        if rl_note and self.config.loss != "off":
            self.config = self.config.replace(loss="off")
        self.report = patch(model, self.config)
        self._add_notes(cfg, self.report)
        if not self._logged:
            self._logged = True
            LOG.info("%s", self.report)
            curve = _loss_curve_note(cfg, self.config)
            if curve:
                LOG.info("sloth_plugins: %s", curve)

    def _add_notes(self, cfg, report: PatchReport) -> None:
        """The Axolotl-side notes, also onto the report SlothCallback made when it patched again."""
        for note in (_rl_loss_note(cfg), self.config and _packing_note(cfg, self.config)):
            if note and note not in report.notes:
                report.note(note)

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        from .hf import SlothCallback
        # Under rl: the user's loss setting, so that the callback names the TRL trainer that owns the loss.
        config = sloth_config_from(cfg) if cfg.get("rl") or self.config is None else self.config
        return [SlothCallback(config, verbose=False)]

    def post_train(self, cfg, model) -> None:
        state = get_state(model)
        if state is not None:
            self.report = state.report
            self._add_notes(cfg, self.report)
        if self.report is None or not cfg.output_dir or not _is_main_process():
            return
        os.makedirs(cfg.output_dir, exist_ok=True)
        data: Any = {"config": self.config.to_dict() if self.config else None, "taken_over": self.taken_over,
                     "report": self.report.to_dict()}
        with open(os.path.join(cfg.output_dir, REPORT_FILE), "w") as f:
            json.dump(data, f, indent=2, default=str)
