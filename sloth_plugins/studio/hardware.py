"""The hardware panel: this machine's GPUs, and what a run will need before it starts.

The memory estimate is the checkpointing plan's own prediction (``checkpointing.plan``:
``predict_peak`` / ``plan_layers``) fed with numbers known before training:

* **decoder-layer activations**: measured, not guessed. ``auto`` measures each layer in the
  first training forward (``checkpointing.measure.MemoryMeter.probe``), so before a run starts
  there is nothing measured yet; here that same probe runs on a one-layer copy of the model
  (real hidden, intermediate and head sizes; vocabulary shrunk to 256, which a decoder layer
  never sees) with the run's dtype, LoRA and SlothConfig, on the CPU, for ``PROBE_TOKENS``
  tokens, and is scaled linearly to a micro-batch of ``batch size x max_length`` tokens, as
  ``auto`` itself scales (exact for SDPA / flash attention; eager attention's quadratic part is
  underestimated). On the CPU the kernels' torch reference paths run, not the Triton kernels,
  so the saved tensors can differ from a GPU run's.
* **weights**: the parameters of the model built on the meta device, at 2 bytes (bf16 / fp16)
  or 4 (fp32); QLoRA's quantised decoder linears at 0.5 bytes plus one fp32 scale per 64
  weights (nf4 without double quantisation, as the studio loads it).
* **trainable state**: LoRA: the adapter's parameters (PEFT on the meta model) in fp32 with
  their gradient and AdamW's two moments, 16 bytes each; full fine-tune: a gradient and two
  AdamW moments in the parameter's dtype.
* **loss**: the chunked loss holds one chunk of fp32 logits and its gradient (a chunk is at
  most 256 MiB of logits), ``loss='off'``: the full logits in the model's dtype plus fp32
  copies for the log-softmax and its gradient (``tokens x vocab x (dtype + 8)`` bytes).

Then the plan: ``gradient_checkpointing`` ``recompute`` / ``offload`` / ``off`` (TRL's
``SFTConfig`` turns the framework's checkpointing on, so ``off`` recomputes through transformers)
are fixed decisions; ``auto`` plans against its budget exactly as the run will, or recomputes
every layer without a budget (no GPU, no ``memory_budget_gb``). It is an estimate before the
first step: the run's ``auto`` measures the real numbers in that step and plans again.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..checkpointing.plan import (
    KEEP,
    OFFLOAD,
    RECOMPUTE,
    CheckpointPlan,
    LayerMemory,
    MemoryModel,
    plan_layers,
    predict_peak,
)

GiB = float(2 ** 30)
PROBE_TOKENS = 64
PROBE_VOCAB = 256
MAX_PROBE_LAYER_BYTES = 6 * 2 ** 30     # a decoder layer larger than this is not built on the CPU
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64     # 4 bits, one fp32 absmax per block of 64
LOSS_CHUNK_MAX_BYTES = 256 * 2 ** 20    # the chunked loss's largest chunk of fp32 logits


def size(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


def devices() -> List[Dict[str, Any]]:
    """Each CUDA device: name, total and free memory (GiB)."""
    import torch
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append({"index": i, "name": torch.cuda.get_device_name(i), "total_gib": total / GiB,
                    "free_gib": free / GiB})
    return out


def devices_text(found: Optional[List[Dict[str, Any]]] = None) -> str:
    found = devices() if found is None else found
    if not found:
        return "no GPU: CPU run (fp32; bf16/fp16 and QLoRA need a GPU)"
    return "\n".join(f"cuda:{d['index']}  {d['name']}: {d['free_gib']:.1f} GiB free of {d['total_gib']:.1f} GiB"
                     for d in found)


@dataclass
class MemoryEstimate:
    weights_bytes: int
    trainable_bytes: int
    loss_bytes: int
    layer: Optional[LayerMemory]           # one decoder layer at the run's tokens per micro-batch
    layers: int
    tokens: int
    decisions: tuple
    peak_bytes: Optional[int]
    budget_bytes: Optional[int]
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"weights {size(self.weights_bytes)}, trainable state (weights/gradients/AdamW) "
                 f"{size(self.trainable_bytes)}, loss {size(self.loss_bytes)}"]
        if self.layer is not None:
            lines.append(f"{self.layers} decoder layers at {self.tokens} tokens per micro-batch: "
                         f"{size(self.layer.full_bytes)} of activations each when kept, "
                         f"{size(self.layer.input_bytes)} when recomputed")
            counts = {d: self.decisions.count(d) for d in (KEEP, RECOMPUTE, OFFLOAD)}
            budget = f" (auto budget {size(self.budget_bytes)})" if self.budget_bytes else ""
            lines.append(f"plan: {counts[KEEP]} keep, {counts[RECOMPUTE]} recompute, {counts[OFFLOAD]} offload{budget}")
        if self.peak_bytes is not None:
            lines.append(f"**estimated peak: {size(self.peak_bytes)}** (before the first step; the run's "
                         f"auto plan measures and re-plans)")
        lines += self.notes
        return "\n".join(lines)


def _dtype(config: Dict[str, Any]):
    import torch
    precision = config["training"]["precision"]
    if config["method"] == "qlora":
        return torch.bfloat16 if precision == "bf16" else torch.float16    # the compute dtype
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _shrunk(model_config):
    """The model's config with one decoder layer and a small vocabulary."""
    small = copy.deepcopy(model_config)
    small.num_hidden_layers = 1
    if getattr(small, "layer_types", None):
        types = list(small.layer_types)
        small.layer_types = ["full_attention"] if "full_attention" in types else types[:1]
    small.vocab_size = PROBE_VOCAB
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(small, name, None)
        if isinstance(value, int) and value >= PROBE_VOCAB:
            setattr(small, name, PROBE_VOCAB - 1)
        elif isinstance(value, list):
            setattr(small, name, [min(v, PROBE_VOCAB - 1) for v in value])
    small.use_cache = False
    return small


def probe_layer(model_config, config: Dict[str, Any], tokens: int = PROBE_TOKENS) -> Optional[LayerMemory]:
    """One decoder layer's activations for ``tokens`` tokens, measured by auto's own probe on a
    one-layer copy of the model (CPU); None when the layer is not checkpointable by sloth."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..checkpointing import get_checkpoint_controller
    from ..config import SlothConfig
    from ..manager import patch
    from .config import lora_config_kwargs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_shrunk(model_config), dtype=_dtype(config))
    if config["method"] in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(**lora_config_kwargs(config["lora"])))
    model.train()
    sloth = {**config["sloth"], "gradient_checkpointing": "auto", "memory_budget_gb": 1e6, "strict": False}
    patch(model, SlothConfig(**sloth))
    controller = get_checkpoint_controller(model)
    if controller is None:
        return None
    ids = torch.randint(0, PROBE_VOCAB, (1, tokens))
    model(input_ids=ids, labels=ids).loss.backward()
    measured = controller.meter.layer_memory
    return measured[0] if measured else None


def _trainable_params(meta_model, config: Dict[str, Any]) -> int:
    if config["method"] == "full":
        return sum(p.numel() for p in meta_model.parameters())
    import torch
    from peft import LoraConfig, get_peft_model

    from .config import lora_config_kwargs
    with torch.device("meta"):
        peft_model = get_peft_model(meta_model, LoraConfig(**lora_config_kwargs(config["lora"])))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _weights_bytes(meta_model, config: Dict[str, Any], dtype_bytes: int) -> int:
    import torch
    if config["method"] != "qlora":
        return sum(p.numel() for p in meta_model.parameters()) * dtype_bytes
    out_embeddings = meta_model.get_output_embeddings()
    quantised = sum(m.weight.numel() for m in meta_model.modules()
                    if isinstance(m, torch.nn.Linear) and m is not out_embeddings)
    total = sum(p.numel() for p in meta_model.parameters())
    return int(quantised * NF4_BYTES_PER_WEIGHT + (total - quantised) * dtype_bytes)


def budget_bytes(config: Dict[str, Any], found: List[Dict[str, Any]]) -> Optional[int]:
    """auto's budget: memory_budget_gb, else 90% of the first GPU (the checkpointing plugin's rule)."""
    if config["sloth"].get("memory_budget_gb") is not None:
        return int(config["sloth"]["memory_budget_gb"] * GiB)
    return int(0.9 * found[0]["total_gib"] * GiB) if found else None


def estimate_memory(config: Dict[str, Any], found: Optional[List[Dict[str, Any]]] = None) -> MemoryEstimate:
    """The device memory ``config`` (a checked run config) will need, before the run starts."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..checkpointing.offload import offload_min_bytes
    from ..doctor import _model_config

    found = devices() if found is None else found
    model_config = _model_config(config["model"])
    dtype = _dtype(config)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    n_layers = int(model_config.num_hidden_layers)
    weights = _weights_bytes(meta_model, config, dtype_bytes)
    train = config["training"]
    tokens = int(train["per_device_train_batch_size"]) * int(train["max_length"])
    vocab = int(model_config.vocab_size)
    if config["sloth"].get("loss", "chunked") == "chunked":
        chunk = min(tokens * vocab * 4, LOSS_CHUNK_MAX_BYTES)
        loss_bytes = 2 * chunk + tokens * int(model_config.hidden_size) * 4
    else:
        loss_bytes = tokens * vocab * (dtype_bytes + 8)
    notes = []
    embed = meta_model.get_input_embeddings().weight.numel()
    head = meta_model.get_output_embeddings()
    tied = head is not None and head.weight is meta_model.get_input_embeddings().weight
    head = head.weight.numel() if head is not None and not tied else 0
    layer_params = (sum(p.numel() for p in meta_model.parameters()) - embed - head) / max(n_layers, 1)
    # LoRA: the adapter's fp32 weights, gradients and AdamW moments (16 bytes); full: gradient + 2 moments
    trainable = _trainable_params(meta_model, config)   # (PEFT wraps meta_model: count the layers first)
    trainable_bytes = trainable * (16 if config["method"] != "full" else 3 * dtype_bytes)
    layer = None
    if layer_params * 4 > MAX_PROBE_LAYER_BYTES:
        notes.append(f"a decoder layer has {layer_params / 1e9:.1f}B parameters: too large to measure on the CPU "
                     f"here; activations not estimated")
    else:
        try:
            probed = probe_layer(model_config, config)
        except Exception as exc:  # noqa: BLE001 - shown to the user, the rest of the estimate stands
            probed = None
            notes.append(f"could not measure a decoder layer: {type(exc).__name__}: {exc}")
        if probed is not None:
            layer = probed.scaled(tokens / PROBE_TOKENS)
        elif not notes:
            notes.append("sloth does not checkpoint this model's decoder layers: activations not estimated")
    if found and dtype == torch.float32:
        notes.append("fp32 on a GPU: bf16 halves the weights and most activations")
    if not found:
        notes.append("no GPU: a CPU run uses host memory; the numbers are what a GPU would need")
    budget = budget_bytes(config, found)
    base = weights + trainable_bytes
    memory = MemoryModel(base, loss_bytes, loss_bytes, offload_min_bytes(torch.device("cuda" if found else "cpu")))
    decisions, peak = (), None
    if layer is not None:
        layers = [layer] * n_layers
        mode = config["sloth"].get("gradient_checkpointing", "auto")
        if mode == "auto" and budget is not None:
            plan: CheckpointPlan = plan_layers(layers, budget, memory)
            decisions, peak = plan.decisions, plan.predicted_peak_bytes
            if not plan.fits:
                notes.append(f"**over budget**: {plan.summary()}")
        else:
            decisions = ((OFFLOAD,) * (n_layers - 1) + (RECOMPUTE,)) if mode == "offload" else (RECOMPUTE,) * n_layers
            peak = predict_peak(layers, decisions, memory)
        if found and peak > found[0]["free_gib"] * GiB:
            notes.append(f"**more than the {found[0]['free_gib']:.1f} GiB free on cuda:0**")
    return MemoryEstimate(weights, trainable_bytes, loss_bytes, layer, n_layers, tokens, tuple(decisions), peak,
                          budget, notes)


def run_patch_report(config: Dict[str, Any]) -> str:
    """The PatchReport the run would get (``sloth doctor``'s logic: the model on the meta device, with
    the run's LoRA for LoRA / QLoRA runs)."""
    from ..config import SlothConfig
    from ..doctor import patch_report
    from .config import lora_config_kwargs
    lora = lora_config_kwargs(config["lora"]) if config["method"] != "full" else None
    text = str(patch_report(config["model"], SlothConfig(**config["sloth"]), lora=lora))
    text += "\n  note: " + trl_loss_note()
    if config["method"] == "qlora":
        text += ("\n  note: built without quantisation (meta device): a QLoRA run's 4-bit layers may be "
                 "patched differently")
    return text


def trl_loss_note() -> str:
    """What the run's SFTTrainer does to the loss row, which the model alone cannot show."""
    from importlib.metadata import version
    trl = version("trl")
    if tuple(int(x) for x in trl.split(".")[:2]) < (1, 16):
        return (f"the run's TRL {trl} SFTTrainer replaces the model's forward with its own chunked loss "
                f"(loss_type='chunked_nll', its default) before SlothCallback patches: the run's loss row falls "
                f"back to it (it never builds full logits either)")
    return (f"the run's TRL {trl} SFTTrainer installs its own fused LM head for the training loss after "
            f"SlothCallback patched: sloth's chunked loss serves the other forward calls")
