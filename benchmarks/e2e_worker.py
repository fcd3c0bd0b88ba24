"""One end-to-end measurement in its own process; driven by benchmarks/e2e.py.

    e2e_worker.py create --model llama-1b --dir /tmp/m       # random-init model + tokenizer, saved
    e2e_worker.py train --impl sloth --dir /tmp/m ...         # LoRA/QLoRA steps, timed

Progress and the result go to stdout as lines ``@@SLOTHBENCH@@ <json>`` (events "loaded",
"step", "result", and "profile" with ``--profile 1``); everything else the libraries print
passes through untouched.

The loop is the same for every implementation: fixed random token batches (same seed, same
data for all), labels = input_ids (the model shifts), ``model(input_ids, labels).loss``,
backward, AdamW step, zero_grad; bf16 runs under torch.autocast(bfloat16) as HF Trainer's
bf16=True does; torch.cuda.synchronize() around every step. Peak memory is
torch.cuda.max_memory_allocated() from after loading (weights included) to the end, kept
across anyone's torch.cuda.reset_peak_memory_stats (sloth's auto checkpointing resets the
counter while it measures a step): see PeakMemory.

``--profile 1``: after the timed steps (so the timings and peaks above are unaffected), two
more steps run under torch.profiler; the device time of every CUDA kernel and copy (CPU
self time of every op on CPU) is summed per category (PROFILE_CATEGORIES) and per kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

_HERE = Path(__file__).resolve().parent
# benchmarks/kernels.py must never be importable as Hugging Face's `kernels` package
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _HERE]

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "UNSLOTH_DISABLE_STATISTICS": "1", "DO_NOT_TRACK": "1", "AXOLOTL_DO_NOT_TRACK": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

MARK = "@@SLOTHBENCH@@ "
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# rope: plain theta=500000 for both (Llama-3.2's "llama3" frequency scaling only changes the
# cos/sin tables, not the cost, and keeps every implementation on its default rotary path).
MODELS = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                     max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                     max_position_embeddings=8192, rms_norm_eps=1e-5),
    # llama-8b's 32 layers and modules at 1/16 of its widths: the GPU finishes each kernel long
    # before the next is launched, so a step's time is the Python and launch cost of the step.
    "llama-8b-host": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=32, num_attention_heads=4,
                          num_key_value_heads=1, vocab_size=2048, tie_word_embeddings=False,
                          max_position_embeddings=8192, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
                 max_position_embeddings=256, rms_norm_eps=1e-5),
}
ROPE_THETA = 500000.0


def emit(event: str, **data) -> None:
    print(MARK + json.dumps({"event": event, **data}, default=str), flush=True)


def _dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _device(name: str):
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


class PeakMemory:
    """torch.cuda.max_memory_allocated / max_memory_reserved over a run, kept across resets.

    Other code resets the CUDA peak counters mid-run (sloth's auto checkpointing while it
    measures a step; Axolotl's trainer at every log), which would leave the benchmark with the
    peak since the last reset only. Once one of these exists, every torch.cuda.reset_peak_memory_stats
    in the process first folds the current peaks into ours. ``mark()`` starts a window (our own reset);
    ``peak()``/``window_peak()`` read bytes. Without CUDA every reading is None."""

    def __init__(self, device):
        import torch
        self._torch, self.device = torch, device
        self.cuda = device.type == "cuda"
        self.total, self.window = [0, 0], [0, 0]        # [allocated, reserved]
        self.resets_by_others = 0
        self._reset = torch.cuda.reset_peak_memory_stats
        if self.cuda:
            torch.cuda.reset_peak_memory_stats = torch.cuda.memory.reset_peak_memory_stats = self._reset_by_others

    def _fold(self) -> None:
        if self.cuda:
            cuda = self._torch.cuda
            now = [cuda.max_memory_allocated(self.device), cuda.max_memory_reserved(self.device)]
            self.total = [max(a, b) for a, b in zip(self.total, now)]
            self.window = [max(a, b) for a, b in zip(self.window, now)]

    def _reset_by_others(self, device=None) -> None:
        self._fold()
        self.resets_by_others += 1
        self._reset(device)

    def start(self) -> None:
        """Forget everything before now (the run's start)."""
        self.mark()
        self.total = list(self.window)

    def mark(self) -> None:
        """Start a new window; the run's total keeps what came before."""
        self._fold()
        if self.cuda:
            self._reset(self.device)
        self.window = [0, 0]
        self._fold()

    def peak(self, reserved: bool = False) -> Optional[int]:
        self._fold()
        return self.total[int(reserved)] if self.cuda else None

    def window_peak(self, reserved: bool = False) -> Optional[int]:
        self._fold()
        return self.window[int(reserved)] if self.cuda else None


# ------------------------------------------------------------------------------------- profiling

# Kernel (CUDA) or op (CPU) name -> category: the first pattern found in the name wins
# (case-insensitive). Order matters: fmha_cutlass* kernels are attention, not matmul; our
# attention kernels' names are generic (_fwd_kernel) and match exactly; _gated_bwd_inplace_kernel
# is the fused LoRA MLP's backward. Activation/norm/rope/loss names also catch Unsloth's and
# Liger's Triton kernels (the category is the work, not whose kernel did it).
PROFILE_CATEGORIES: List[Tuple[str, str]] = [
    ("communication (nccl)", r"nccl"),
    ("memcpy HtoD", r"memcpy htod"),
    ("memcpy DtoH", r"memcpy dtoh"),
    ("lora (fused)", r"lora|^_gated_bwd_inplace_kernel$"),
    ("attention", r"flash|fmha|sdpa|attention|cudnn|^_(fwd|dq|dkdv|delta)_kernel$"),
    ("rms_norm", r"rms_?norm|rms_layernorm"),
    ("rope", r"rope|rotary"),
    ("swiglu/geglu", r"swiglu|geglu|_gated_(fwd|bwd)_kernel|_fg_kernel|dwf_dw_dfg"),
    ("cross_entropy", r"cross_entropy|nll_loss|softmax"),
    ("bnb dequant", r"kdequantize|kquantize|dequantize_blockwise|kgemm_4bit|bitsandbytes"),
    ("nf4 dequant (triton)", r"dequant|nf4"),
    ("optimizer", r"adam|foreach|multi_tensor_apply|optimizer"),
    ("matmul", r"gemm|gemv|cutlass|cublas|nvjet|xmma|wgmma|splitk|"
               r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation)$"),
    ("elementwise/copy", r"elementwise|vectorized|unrolled|copy|memcpy|memset|fill|reduce|catarray|index|gather|"
                         r"scatter|embedding|where|triton_(poi|red|per)_|^aten::"),
]
OTHER = "other"
# CUPTI's synchronization records (only with the profiler's cuda-sync option) are waits, not work
_SYNC_EVENT = re.compile(r"^(stream|event|context|device) (sync|wait)", re.IGNORECASE)
_COMPILED_CATEGORIES = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in PROFILE_CATEGORIES]


def categorize(name: str) -> str:
    for category, pattern in _COMPILED_CATEGORIES:
        if pattern.search(name):
            return category
    return OTHER


def _busy_us(intervals: Sequence[Tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams overlap)."""
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    return busy


def summarize_profile(records: Sequence[Tuple[str, float, float, float]], n_steps: int, step_s: Optional[float],
                      source: str, top: int = 15, intervals: bool = True) -> dict:
    """records: (name, microseconds, start_us, end_us) per kernel launch (or op). Returns per
    category and per name milliseconds per step, and their share of ``step_s`` (the unprofiled
    step time)."""
    by_category, by_name, calls = defaultdict(float), defaultdict(float), defaultdict(int)
    for name, us, _start, _end in records:
        by_category[categorize(name)] += us
        by_name[name] += us
        calls[name] += 1
    step_ms = step_s * 1e3 if step_s else None

    def share(us: float) -> dict:
        ms = us / 1e3 / n_steps
        return {"ms_per_step": round(ms, 4), "pct_of_step": round(100 * ms / step_ms, 2) if step_ms else None}

    total_us = sum(by_category.values())
    out = {"source": source, "steps": n_steps, "step_ms": round(step_ms, 3) if step_ms else None,
           "events": len(records), "total": share(total_us),
           "categories": [{"category": c, **share(us)}
                          for c, us in sorted(by_category.items(), key=lambda kv: -kv[1])],
           "top_kernels": [{"name": n[:200], "category": categorize(n), "calls_per_step": calls[n] / n_steps,
                            **share(us)} for n, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]]}
    if intervals:       # device time on any stream; idle = the unprofiled step minus that (launch gaps, syncs)
        busy_us = _busy_us([(s, e) for _n, _us, s, e in records])
        out["device_busy"] = share(busy_us)
        if step_ms:
            out["device_idle"] = share(max(0.0, step_ms * 1e3 * n_steps - busy_us))
    return out


CUDA_SOURCE = "CUDA kernels and copies, device time"


def cuda_records(prof) -> List[Tuple[str, float, float, float]]:
    """summarize_profile's records from a torch.profiler run: kernels, memcpys and memsets, one
    event each, timed on the device (CUPTI's synchronization waits left out)."""
    from torch.autograd import DeviceType
    return [(e.name, e.time_range.elapsed_us(), e.time_range.start, e.time_range.end)
            for e in prof.events() if e.device_type == DeviceType.CUDA and not _SYNC_EVENT.search(e.name)]


def profile_steps(step, batches, device, step_s: Optional[float]) -> dict:
    """Run ``step(ids)`` for each batch under torch.profiler; summarize device (CUDA) or CPU time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    walls = []
    with profile(activities=activities) as prof:
        for ids in batches:
            if cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            step(ids)
            if cuda:
                torch.cuda.synchronize(device)
            walls.append(time.perf_counter() - t)
    t = time.perf_counter()
    if cuda:
        records, source = cuda_records(prof), CUDA_SOURCE
    else:         # nested ops: self time only, so nothing counts twice
        records = [(e.name, e.self_cpu_time_total, e.time_range.start, e.time_range.end)
                   for e in prof.events() if e.device_type == DeviceType.CPU and not e.is_async]
        source = "CPU ops, self time"
    out = summarize_profile(records, len(batches), step_s, source, intervals=cuda)
    out["profiled_step_ms"] = round(1e3 * sum(walls) / len(walls), 3)
    out["analysis_s"] = round(time.perf_counter() - t, 1)
    if cuda and not records:
        out["note"] = "no CUDA events recorded (CUPTI unavailable?)"
    return out


def host_profile_steps(step, batches, device, top: int = 60) -> dict:
    """Run ``step(ids)`` for each batch under cProfile (host time: Python and launches, and any
    wait for the device inside the step). Per function: calls, own and cumulative ms per step."""
    import cProfile
    import pstats

    import torch
    cuda = device.type == "cuda"
    prof = cProfile.Profile()
    walls = []
    for ids in batches:
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        prof.enable()
        step(ids)
        prof.disable()
        if cuda:
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - t)
    n = len(batches)
    stats = pstats.Stats(prof).stats      # (file, line, name) -> (primitive calls, calls, tottime, cumtime, callers)

    def where(key) -> str:
        file, line, name = key
        if file == "~":
            return name
        parts = Path(file).parts
        return f"{'/'.join(parts[-2:])}:{line}({name})"

    def rows(index: int) -> list:
        ranked = sorted(stats.items(), key=lambda kv: -kv[1][index])[:top]
        return [{"function": where(k), "calls_per_step": v[1] / n, "own_ms_per_step": round(1e3 * v[2] / n, 3),
                 "cum_ms_per_step": round(1e3 * v[3] / n, 3)} for k, v in ranked]

    return {"source": "cProfile, host time", "steps": n, "profiled_step_ms": round(1e3 * sum(walls) / n, 3),
            "python_calls_per_step": sum(v[1] for v in stats.values()) / n,
            "by_own_time": rows(2), "by_cumulative_time": rows(3)}


class GcTime:
    """Time Python's cyclic garbage collector spends inside each step, and its collections per generation."""

    def __init__(self):
        import gc
        self._t0, self.ms, self.counts = None, 0.0, [0, 0, 0]
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.ms += 1e3 * (time.perf_counter() - self._t0)
            self.counts[info["generation"]] += 1

    def start_step(self) -> None:
        self.ms, self.counts = 0.0, [0, 0, 0]

    def end_step(self) -> tuple:
        return round(self.ms, 3), list(self.counts)


# ---------------------------------------------------------------------------------------- create

def _tokenizer():
    """A small byte-level BPE trained here (no hub): Unsloth's loader wants a tokenizer in the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = [f"The quick brown fox {i} jumps over the lazy dog number {i * 7}." for i in range(64)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def llama_config(name: str, tok=None):
    from transformers import LlamaConfig
    kw = dict(MODELS[name])
    if tok is not None:
        kw.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    try:
        return LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    except TypeError:                      # transformers < 5
        return LlamaConfig(**kw, rope_theta=ROPE_THETA)


def create(args) -> None:
    import shutil

    import torch
    from transformers import LlamaForCausalLM
    target = Path(args.dir)
    if target.exists() and any(target.iterdir()) and not (target / "bench_meta.json").exists():
        raise SystemExit(f"refusing to replace {target}: it exists and was not made by this benchmark")
    t0 = time.perf_counter()
    device, dtype = _device(args.device), _dtype(args.dtype)
    tok = _tokenizer()
    config = llama_config(args.model, tok)
    torch.manual_seed(args.seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):          # random init on the GPU: minutes faster than CPU for 8B
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    tok.save_pretrained(tmp)
    meta = {"model": args.model, "shape": MODELS[args.model], "rope_theta": ROPE_THETA, "seed": args.seed,
            "dtype": args.dtype, "params": n_params, "created_s": round(time.perf_counter() - t0, 1)}
    (tmp / "bench_meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    emit("created", **meta, dir=str(target))


# ----------------------------------------------------------------------------------------- train

def matmul_flops(cfg: dict, seq: int) -> dict:
    """N_matmul = parameters of every linear layer incl. lm_head (LoRA adapters excluded);
    per-token LoRA training FLOPs = 4 N_matmul (forward + input gradients; frozen weights
    get no weight gradient) + 6 L seq d (attention scores, as DESIGN.md counts them)."""
    d, n_layers, inter, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    hq, hk = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // hq
    per_layer = d * hq * hd + 2 * d * hk * hd + hq * hd * d + 3 * d * inter
    n_matmul = n_layers * per_layer + vocab * d
    return {"n_matmul": n_matmul, "flops_per_token": 4 * n_matmul + 6 * n_layers * seq * d}


def _load_hf(args, device, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    info = {}
    if args.impl == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()      # class-level: rope, RMSNorm, SwiGLU, fused linear CE
        info["liger"] = "apply_liger_kernel_to_llama() defaults: rope, rms_norm, swiglu, fused_linear_cross_entropy"
    kw = dict(dtype=dtype, attn_implementation="sdpa")
    if args.qlora:
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    elif device.type == "cuda":
        kw["device_map"] = {"": device.index}
    model = AutoModelForCausalLM.from_pretrained(args.dir, **kw)
    if not args.qlora and device.type != "cuda":
        model.to(device)
    model.config.use_cache = False
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        info["gradient_checkpointing"] = "HF gradient_checkpointing_enable(use_reentrant=False)"
    torch.manual_seed(args.seed)           # same LoRA A init for hf_peft, sloth and liger
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             bias="none", target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    if args.impl == "sloth":
        import sloth_plugins as sloth
        # SLOTH_BENCH_CONFIG='{"gradient_checkpointing": "offload"}' benchmarks other modes
        options = json.loads(os.environ.get("SLOTH_BENCH_CONFIG") or "{}")
        report = sloth.patch(model, sloth.SlothConfig(**options))
        info["sloth_config"] = options
        info["patch_report"] = report.summary()
        info["patch_notes"] = list(report.notes)
    return model, info


def _load_unsloth(args, device, dtype):
    import unsloth  # noqa: F401  (first: it patches transformers/peft on import)
    from unsloth import FastLanguageModel
    gc = (args.unsloth_gc if args.unsloth_gc == "unsloth" else True) if args.grad_ckpt else False
    model, _tok = FastLanguageModel.from_pretrained(
        model_name=args.dir, max_seq_length=args.seq_len, dtype=dtype, load_in_4bit=args.qlora,
        use_gradient_checkpointing=gc, random_state=args.seed)
    model = FastLanguageModel.get_peft_model(
        model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0, bias="none",
        target_modules=LORA_TARGETS, use_gradient_checkpointing=gc, random_state=args.seed)
    FastLanguageModel.for_training(model, use_gradient_checkpointing=gc)
    return model, {"gradient_checkpointing": f"unsloth use_gradient_checkpointing={gc!r}"}


def train(args) -> None:
    if args.impl == "unsloth":
        import unsloth  # noqa: F401  (must precede transformers/peft/torch-heavy imports)
    import torch

    device, dtype = _device(args.device), _dtype(args.dtype)
    cfg = json.loads((Path(args.dir) / "config.json").read_text())
    flops = matmul_flops(cfg, args.seq_len)
    t0 = time.perf_counter()
    if args.impl == "unsloth":
        model, info = _load_unsloth(args, device, dtype)      # for_training() has set the modes
    else:
        model, info = _load_hf(args, device, dtype)
        model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    info.update(trainable_params=sum(p.numel() for p in trainable),
                lora_param_dtype=str(trainable[0].dtype) if trainable else None)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    load_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(args.seed)
    n_steps = args.warmup + args.steps
    batches = [torch.randint(0, cfg["vocab_size"], (args.batch_size, args.seq_len), generator=gen).to(device)
               for _ in range(n_steps)]
    cuda = device.type == "cuda"
    memory = PeakMemory(device)
    if cuda:
        torch.cuda.synchronize(device)
        info["model_mem_gib"] = torch.cuda.memory_allocated(device) / 2**30
    memory.start()
    emit("loaded", impl=args.impl, load_s=round(load_s, 1), **info)
    use_autocast = bool(dtype in (torch.bfloat16, torch.float16) and args.autocast)
    tokens = args.batch_size * args.seq_len

    def step(ids):
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    gc_time = GcTime()

    losses, times, loss, host_times, gc_steps = [], [], None, [], []
    for i, ids in enumerate(batches):
        if i == args.warmup:
            memory.mark()
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        gc_time.start_step()
        loss = step(ids)
        host = time.perf_counter() - t
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        gc_ms, gc_counts = gc_time.end_step()
        losses.append(float(loss.detach().float().item()))
        times.append(dt)
        host_times.append(host)
        gc_steps.append((gc_ms, gc_counts))
        emit("step", impl=args.impl, step=i, warmup=i < args.warmup, loss=losses[-1], step_s=dt,
             tok_s=tokens / dt, host_s=host, gc_ms=gc_ms, gc_collections=gc_counts)
    loss = None
    timed = times[args.warmup:]
    tok_s = tokens * len(timed) / sum(timed) if timed else None
    gib = lambda b: b / 2**30 if b is not None else None
    result = {
        "impl": args.impl, "ok": True, "load_s": load_s, "tokens_per_step": tokens, "tok_s": tok_s,
        "step_s_mean": sum(timed) / len(timed) if timed else None, "step_s": times, "losses": losses,
        "loss_step0": losses[0], "loss_final": losses[-1],
        # host_s: until step() returned, before the closing synchronize (equal to the step: host-bound)
        "host_s": host_times, "gc_ms_per_timed_step": sum(g[0] for g in gc_steps[args.warmup:]) / max(1, len(timed)),
        "gc_collections_timed": [sum(g[1][k] for g in gc_steps[args.warmup:]) for k in range(3)],
        "peak_mem_gib": gib(memory.peak()),                     # from after loading, every step
        "peak_mem_timed_gib": gib(memory.window_peak()) if timed else None,
        "peak_reserved_gib": gib(memory.peak(reserved=True)),
        "peak_resets_by_others": memory.resets_by_others,
        "mfu": tok_s * flops["flops_per_token"] / args.peak_flops if tok_s else None,
        **flops, "autocast": use_autocast, **info,
    }
    emit("result", **result)
    if args.profile:
        try:
            profile = profile_steps(step, batches[-2:], device, result["step_s_mean"] or times[-1])
        except Exception as exc:  # the timed result is already out; a failed profile must not void it
            profile = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        emit("profile", impl=args.impl, **profile)
    if args.host_profile:
        try:
            host = host_profile_steps(step, batches[-3:], device)
        except Exception as exc:
            host = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        emit("host_profile", impl=args.impl, **host)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="one e2e benchmark step loop (see benchmarks/e2e.py)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    c.add_argument("--model", choices=sorted(MODELS), required=True)
    c.add_argument("--dir", required=True)
    c.add_argument("--device", default="auto")
    c.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    c.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train")
    t.add_argument("--impl", required=True, choices=["hf_peft", "sloth", "liger", "unsloth"])
    t.add_argument("--dir", required=True)
    t.add_argument("--device", default="auto")
    t.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    t.add_argument("--batch-size", type=int, required=True)
    t.add_argument("--seq-len", type=int, required=True)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--grad-ckpt", type=int, default=1)
    t.add_argument("--qlora", type=int, default=0)
    t.add_argument("--autocast", type=int, default=1)
    t.add_argument("--lora-r", type=int, default=16)
    t.add_argument("--lora-alpha", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--peak-flops", type=float, default=790e12)
    t.add_argument("--unsloth-gc", default="unsloth", choices=["unsloth", "true"])
    t.add_argument("--profile", type=int, default=0, help="1: after the timed steps, profile 2 more steps")
    t.add_argument("--host-profile", type=int, default=0, help="1: then 3 more steps under cProfile")
    args = p.parse_args(argv)
    create(args) if args.cmd == "create" else train(args)


if __name__ == "__main__":
    main()
