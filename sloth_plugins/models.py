"""Finding the transformers causal LM inside what a framework hands us."""
from __future__ import annotations

from typing import Any

import torch


def resolve_causal_lm(model: Any) -> torch.nn.Module:
    """Peel PEFT / DDP wrappers off to the transformers CausalLM, or raise a clear TypeError.

    A model with another head on a decoder (``LlamaForSequenceClassification``: reward models)
    passes too: kernels and checkpointing patch its decoder; the loss plugin stands aside."""
    inner = model
    for _ in range(8):
        if hasattr(inner, "get_base_model") and callable(inner.get_base_model) and inner is not inner.get_base_model():
            inner = inner.get_base_model()          # peft.PeftModel
        elif isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
        else:
            break
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:  # pragma: no cover - transformers is an optional extra
        raise ImportError("sloth_plugins.patch needs transformers: pip install 'sloth_plugins[hf]'") from exc
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"sloth_plugins.patch expects a transformers causal LM (e.g. LlamaForCausalLM) or a PEFT "
                        f"model wrapping one; got {type(model).__name__}")
    if inner.get_output_embeddings() is None and not _has_decoder(inner):
        raise TypeError(f"{type(inner).__name__} has no language-model head (get_output_embeddings() is None): "
                        f"sloth_plugins patches causal LMs; load the model with AutoModelForCausalLM")
    return inner


def _has_decoder(model) -> bool:
    """A decoder module under ``base_model_prefix`` (``model.model`` of LlamaForSequenceClassification)."""
    decoder = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    return isinstance(decoder, torch.nn.Module) and decoder is not model
