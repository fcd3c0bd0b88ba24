"""Padding-free SFT benchmark: variable-length samples, padded vs packed, real tokens/s.

    python benchmarks/padding_free.py --model llama-1b            # every impl, 48 samples a step
    python benchmarks/padding_free.py --model llama-8b --impls hf_peft,sloth,unsloth
    python benchmarks/padding_free.py --model llama-1b --tokens-per-step 16384
    python benchmarks/padding_free.py --smoke                     # tiny model, fp32, CPU, 3 impls

Data: seeded synthetic token-id samples with long-tailed lengths (lognormal, clipped to
[--min-len, --max-len], mu solved so the clipped mean is --mean-len: about 350 tokens, a few
samples at 2048). Every implementation sees the same samples in the same order: each step takes
the next --samples-per-step samples (or, with --tokens-per-step, as many as fit in that budget).
Labels are the input ids; loss = mean over the real label tokens of the step (every forward gets
num_items_in_batch = that count, as HF Trainer passes it).

Implementations (each in its own process, only when importable):
  hf_peft         padded: HF + PEFT, SDPA; micro-batches of --micro-batch samples right-padded to
                  their longest sample (DataCollatorWithPadding), attention mask, labels -100 at
                  pads, gradients accumulated over the step's micro-batches
  sloth           packed: the step's samples in one row [1, N] by PaddingFreeCollator (position ids
                  restart, cu_seq_lens), sloth.patch(model, SlothConfig(padding_free=True))
  unsloth         padded: the padded micro-batches through Unsloth's FastLanguageModel
  unsloth_packed  packed: Unsloth's own padding-free path (the packed row + packed_seq_lengths)
  sloth_padded    padded: sloth.patch(model, SlothConfig()) on the padded micro-batches, which
                  splits sloth's gain into kernels (this row) and padding-free (the sloth row)
  sloth_unpad     in-model: the padded micro-batches into SlothConfig(padding_free=True), which
                  drops the pads and packs each micro-batch inside the forward (the drop-in path
                  for an unchanged padding collator; "processed" still counts the pads fed in)
  hf_peft_packed  packed: HF + PEFT on the packed row (SDPA, transformers reads the restarting
                  position ids and builds a per-sample mask)
SLOTH_BENCH_CONFIG='{"attention": "sloth"}' adds SlothConfig keys for every sloth row.
LoRA r16 alpha16 dropout 0 on q,k,v,o,gate,up,down, AdamW lr 1e-4, bf16 autocast, checkpointing
on, on the random-init model folder benchmarks/e2e.py uses (created once, shared with it).

Reports per implementation: real (non-pad) tokens/s, processed tokens/s (pads included), padding
fraction, step ms, peak memory (max_memory_allocated, weights included), MFU on real tokens
(4*N_matmul per token + 6*L*d*sum(len^2) per step over 790e12) and the step-0 / final loss (the
same real tokens: they should agree). Writes <out>/padding_free_<model>.json (after every
implementation) and .png, and one log per implementation.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (first: keeps benchmarks/ off sys.path)

import argparse
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, List


def _sibling(name: str) -> ModuleType:
    """A module from benchmarks/ (not on sys.path, see _common); neither imports torch at load."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, C.HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


E2E = _sibling("e2e")              # stream_worker, worker_env, ensure_model, run_each
W = _sibling("e2e_worker")         # create, MODELS, LORA_TARGETS, emit, matmul_flops, _device, _dtype

IMPLS = ["hf_peft", "sloth", "unsloth", "unsloth_packed", "sloth_padded", "sloth_unpad", "hf_peft_packed"]
PACKED = {"sloth", "unsloth_packed", "hf_peft_packed"}
LAYOUT = {**{impl: "packed" for impl in PACKED}, "sloth_unpad": "in-model"}
NEEDS = {"hf_peft": ["transformers", "peft"], "hf_peft_packed": ["transformers", "peft"],
         "sloth": ["transformers", "peft", "sloth_plugins"], "sloth_padded": ["transformers", "peft", "sloth_plugins"],
         "sloth_unpad": ["transformers", "peft", "sloth_plugins"],
         "unsloth": ["unsloth", "peft"], "unsloth_packed": ["unsloth", "peft"]}
# samples per step (~16k real tokens at mean 350 for 1b, ~4k for 8b) and samples per padded
# micro-batch: 8 x 2048 (1b) and 4 x 2048 (8b) padded tokens fit HF's full-logit loss
DEFAULTS = {"llama-1b": (48, 8), "llama-8b": (12, 4), "tiny": (4, 2)}
IGNORE = -100


# --------------------------------------------------------------------------------- the dataset

def _clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[min(max(X, lo), hi)] for X ~ LogNormal(mu, sigma)."""
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    inside = math.exp(mu + sigma ** 2 / 2) * (cdf(b - sigma) - cdf(a - sigma))
    return lo * cdf(a) + hi * (1 - cdf(b)) + inside


def lognormal_mu(mean: float, sigma: float, lo: int, hi: int) -> float:
    """mu such that the clipped lognormal has the given mean (bisection; the mean grows with mu)."""
    if not lo < mean < hi:
        raise SystemExit(f"--mean-len {mean} must lie strictly between --min-len {lo} and --max-len {hi}")
    low, high = math.log(lo) - 10 * sigma, math.log(hi) + 10 * sigma
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _clipped_lognormal_mean(mid, sigma, lo, hi) < mean else (low, mid)
    return (low + high) / 2


def length_stream(args) -> Iterator[int]:
    mu = lognormal_mu(args.mean_len, args.sigma, args.min_len, args.max_len)
    rng = random.Random(args.seed)
    while True:
        yield min(args.max_len, max(args.min_len, round(rng.lognormvariate(mu, args.sigma))))


def plan_steps(args) -> List[List[int]]:
    """Sample lengths of every step (warmup first), in dataset order."""
    lengths, steps = length_stream(args), []
    pending = next(lengths)
    for _ in range(args.warmup + args.steps):
        step: List[int] = []
        if args.tokens_per_step:
            while not step or sum(step) + pending <= args.tokens_per_step:
                step.append(pending)
                pending = next(lengths)
        else:
            for _ in range(args.samples_per_step):
                step.append(pending)
                pending = next(lengths)
        steps.append(step)
    return steps


def micro_batches(step: list, size: int) -> List[list]:
    """Consecutive chunks of ``size`` samples (0: one chunk)."""
    size = size or len(step)
    return [step[i:i + size] for i in range(0, len(step), size)]


def padded_tokens(step: List[int], micro: int) -> int:
    return sum(len(mb) * max(mb) for mb in micro_batches(step, micro))


def dataset_summary(args, plan: List[List[int]]) -> dict:
    flat = sorted(n for step in plan for n in step)
    real = [sum(step) for step in plan]
    padded = [padded_tokens(step, args.micro_batch) for step in plan]
    whole = [padded_tokens(step, 0) for step in plan]
    return {
        "distribution": f"lognormal(mu={lognormal_mu(args.mean_len, args.sigma, args.min_len, args.max_len):.4f}, "
                        f"sigma={args.sigma}) clipped to [{args.min_len}, {args.max_len}], target mean {args.mean_len}",
        "samples": len(flat), "mean": statistics.fmean(flat), "median": statistics.median(flat),
        "p95": flat[min(len(flat) - 1, int(0.95 * len(flat)))], "max": flat[-1], "min": flat[0],
        "at_max": sum(n == args.max_len for n in flat),
        "samples_per_step": [len(step) for step in plan], "real_tokens_per_step": real,
        "padded_tokens_per_step": padded, "padding_frac": 1 - sum(real) / sum(padded),
        "padding_frac_whole_step": 1 - sum(real) / sum(whole),
        "fingerprint": fingerprint(plan),
    }


def fingerprint(plan: List[List[int]]) -> str:
    import hashlib
    return hashlib.sha1(json.dumps(plan).encode()).hexdigest()[:12]


def token_ids(plan: List[List[int]], vocab: int, seed: int) -> List[List[List[int]]]:
    rng = random.Random(seed * 1_000_003 + 7)          # its own stream: lengths stay cheap to plan
    return [[[rng.randrange(3, vocab) for _ in range(n)] for n in step] for step in plan]


# ------------------------------------------------------------------------------------- batches

def padded_batch(samples: List[List[int]], pad_id: int) -> dict:
    import torch
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for row, s in enumerate(samples):
        ids[row, :len(s)] = labels[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(samples: List[List[int]], impl: str) -> dict:
    import torch
    from sloth_plugins.integrations.collators import PaddingFreeCollator
    batch = PaddingFreeCollator()([{"input_ids": s} for s in samples])
    if impl == "unsloth_packed":        # Unsloth's padding-free contract: lengths, not cu_seq_lens
        batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
        batch["packed_seq_lengths"] = torch.tensor([len(s) for s in samples], dtype=torch.int32)
    return batch


def step_batches(impl: str, samples: List[List[int]], micro: int, pad_id: int) -> List[dict]:
    if impl in PACKED:
        return [packed_batch(samples, impl)]
    return [padded_batch(chunk, pad_id) for chunk in micro_batches(samples, micro)]


def count_tokens(batches: List[dict]) -> tuple:
    """(real tokens, processed tokens, label tokens the loss averages over) of one step."""
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    processed = sum(b["input_ids"].numel() for b in batches)
    targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    return real, processed, targets


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


# -------------------------------------------------------------------------------------- worker

def _load_hf(args, device, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    info = {}
    kw = dict(dtype=dtype, attn_implementation="sdpa")
    if device.type == "cuda":
        kw["device_map"] = {"": device.index}
    model = AutoModelForCausalLM.from_pretrained(args.dir, **kw)
    if device.type != "cuda":
        model.to(device)
    model.config.use_cache = False
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        info["gradient_checkpointing"] = "HF gradient_checkpointing_enable(use_reentrant=False)"
    torch.manual_seed(args.seed)           # the same LoRA A init for every HF-based row
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             bias="none", target_modules=W.LORA_TARGETS, task_type="CAUSAL_LM"))
    if args.impl.startswith("sloth"):
        import sloth_plugins as sloth
        options = {"padding_free": args.impl != "sloth_padded"}
        options.update(json.loads(os.environ.get("SLOTH_BENCH_CONFIG") or "{}"))
        report = sloth.patch(model, sloth.SlothConfig(**options))
        info.update(sloth_config=options, patch_report=report.summary(), patch_notes=list(report.notes))
    return model, info


def _load_unsloth(args, device, dtype):
    # as benchmarks/e2e_worker.py loads it; max_seq_length = the longest sample: a longer one
    # would make Unsloth extend RoPE past the config (packed rows pass packed_seq_lengths, which
    # lets them exceed it with positions that still restart per sample)
    from unsloth import FastLanguageModel
    gc = (args.unsloth_gc if args.unsloth_gc == "unsloth" else True) if args.grad_ckpt else False
    model, _tok = FastLanguageModel.from_pretrained(
        model_name=args.dir, max_seq_length=args.max_len, dtype=dtype, load_in_4bit=False,
        use_gradient_checkpointing=gc, random_state=args.seed)
    model = FastLanguageModel.get_peft_model(
        model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0, bias="none",
        target_modules=W.LORA_TARGETS, use_gradient_checkpointing=gc, random_state=args.seed)
    FastLanguageModel.for_training(model, use_gradient_checkpointing=gc)
    return model, {"gradient_checkpointing": f"unsloth use_gradient_checkpointing={gc!r}",
                   "unsloth_max_seq_length": args.max_len}


def worker(args) -> None:
    if args.impl.startswith("unsloth"):
        import unsloth  # noqa: F401  (must precede transformers/peft)
    import torch

    device, dtype = W._device(args.device), W._dtype(args.dtype)
    cfg = json.loads((Path(args.dir) / "config.json").read_text())
    plan = plan_steps(args)
    ids = token_ids(plan, cfg["vocab_size"], args.seed)
    pad_id = cfg.get("pad_token_id") or 0
    t0 = time.perf_counter()
    model, info = (_load_unsloth if args.impl.startswith("unsloth") else _load_hf)(args, device, dtype)
    if not args.impl.startswith("unsloth"):
        model.train()                      # Unsloth: for_training() has set the modes
    trainable = [p for p in model.parameters() if p.requires_grad]
    info.update(trainable_params=sum(p.numel() for p in trainable))
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    load_s = time.perf_counter() - t0

    steps = []
    for samples in ids:
        cpu = step_batches(args.impl, samples, args.micro_batch, pad_id)
        real, processed, targets = count_tokens(cpu)
        steps.append(dict(batches=[_to(b, device) for b in cpu], real=real, processed=processed,
                          n_items=torch.tensor(targets, device=device), sq=sum(len(s) ** 2 for s in samples)))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        info["model_mem_gib"] = torch.cuda.memory_allocated(device) / 2 ** 30
    W.emit("loaded", impl=args.impl, load_s=round(load_s, 1), **info)
    use_autocast = bool(dtype in (torch.bfloat16, torch.float16) and args.autocast)
    losses, times = [], []
    for i, step in enumerate(steps):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        total = None
        for batch in step["batches"]:
            with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
                loss = model(**batch, num_items_in_batch=step["n_items"]).loss
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        losses.append(float(total.float().item()))
        times.append(dt)
        W.emit("step", impl=args.impl, step=i, warmup=i < args.warmup, loss=losses[-1], step_s=dt,
               real_tokens=step["real"], processed_tokens=step["processed"], real_tok_s=step["real"] / dt)

    timed = slice(args.warmup, None)
    seconds = sum(times[timed])
    real, processed = sum(s["real"] for s in steps[timed]), sum(s["processed"] for s in steps[timed])
    n_matmul = W.matmul_flops(cfg, 0)["n_matmul"]
    flops = 4 * n_matmul * real + 6 * cfg["num_hidden_layers"] * cfg["hidden_size"] * sum(s["sq"] for s in steps[timed])
    W.emit("result", impl=args.impl, ok=True, layout=LAYOUT.get(args.impl, "padded"),
           load_s=load_s, fingerprint=fingerprint(plan),
           batches_per_step=[len(s["batches"]) for s in steps], real_tokens_per_step=[s["real"] for s in steps],
           processed_tokens_per_step=[s["processed"] for s in steps],
           label_tokens_per_step=[int(s["n_items"]) for s in steps],
           real_tokens=real, processed_tokens=processed, timed_s=seconds,
           real_tok_s=real / seconds if seconds else None, processed_tok_s=processed / seconds if seconds else None,
           padding_frac=1 - real / processed if processed else None,
           step_s_mean=seconds / len(times[timed]) if times[timed] else None, step_s=times, losses=losses,
           loss_step0=losses[0], loss_final=losses[-1],
           peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None,
           peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2 ** 30 if cuda else None,
           mfu=flops / seconds / args.peak_flops if seconds else None, n_matmul=n_matmul,
           autocast=use_autocast, **info)


# -------------------------------------------------------------------------------------- driver

def missing_modules(impl: str, device: str) -> List[str]:
    missing = [m for m in NEEDS[impl] if importlib.util.find_spec(m) is None]
    if impl.startswith("unsloth") and device == "cpu":
        missing.append("a CUDA GPU")
    return missing


WORKER_FLAGS = ["device", "dtype", "warmup", "steps", "samples_per_step", "tokens_per_step", "micro_batch",
                "mean_len", "min_len", "max_len", "sigma", "grad_ckpt", "autocast", "lora_r", "lora_alpha", "lr",
                "seed", "peak_flops", "unsloth_gc"]


def run_impl(impl: str, args, work: Path, progress: C.Progress) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--impl", impl,
           "--dir", str(Path(args.model_dir).resolve())]
    for flag in WORKER_FLAGS:
        cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    state: Dict[str, dict] = {}
    t0 = time.perf_counter()
    n_steps = args.warmup + args.steps

    def on_event(e: dict) -> None:
        if e["event"] == "loaded":
            state["loaded"] = e
            progress.write(f"  [{impl}] loaded in {e['load_s']:.0f} s (process up {time.perf_counter() - t0:.0f} s)"
                           + (f", weights {e['model_mem_gib']:.1f} GiB" if e.get("model_mem_gib") else ""))
            for kind, row in (e.get("patch_report") or {}).items():
                if row.get("fallback"):
                    progress.write(f"  [{impl}] {kind} fell back {row['fallback']}x: {'; '.join(row['why'])[:200]}")
        elif e["event"] == "step":
            progress.update()
            progress.write(f"  [{impl}] step {e['step'] + 1}/{n_steps}{' (warmup)' if e['warmup'] else ''}  "
                           f"loss {e['loss']:.4f}  {e['step_s'] * 1e3:.0f} ms  {e['real_tokens']} real / "
                           f"{e['processed_tokens']} processed tokens  {e['real_tok_s']:,.0f} real tok/s")
        elif e["event"] == "result":
            state["result"] = e
    res = E2E.stream_worker(cmd, Path(args.out_dir) / f"{args.name}_{impl}.log", args.timeout, on_event,
                            args.verbose, work / impl, E2E.worker_env(args.smoke))
    return E2E.worker_outcome(impl, res, state.get("result"), state.get("loaded"), time.perf_counter() - t0,
                              progress)


def _ratio(r: dict, base) -> str:
    return f"{r['real_tok_s'] / base['real_tok_s']:.2f}x" if base else "-"


def summary_table(results: List[dict]) -> str:
    ok = {r["impl"]: r for r in results if r.get("ok")}
    hf, uns = ok.get("hf_peft"), ok.get("unsloth")
    rows, why = [], []
    for r in results:
        if not r.get("ok"):
            rows.append([r["impl"], "skipped" if r.get("skipped") else "FAILED"] + ["-"] * 11)
            why.append(f"  {r['impl']}: {r.get('skipped') or r.get('error')}")
            continue
        rows.append([r["impl"], r["layout"], f"{r['real_tok_s']:,.0f}", _ratio(r, hf), _ratio(r, uns),
                     f"{r['processed_tok_s']:,.0f}", f"{100 * r['padding_frac']:.1f}", f"{r['step_s_mean'] * 1e3:.1f}",
                     C.fmt(r["peak_mem_gib"], 2), f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "-",
                     f"{r['loss_step0']:.5f}", f"{r['loss_final']:.5f}", f"{r['wall_s']:.0f}"])
    return "\n".join([C.text_table(["impl", "layout", "real tok/s", "vs hf_peft", "vs unsloth", "processed tok/s",
                                    "pad %", "step ms", "peak GiB", "MFU %", "loss step0", "loss final", "wall s"],
                                   rows)] + why)


def verdict_lines(results: List[dict]) -> List[str]:
    ok = {r["impl"]: r for r in results if r.get("ok")}
    lines = []
    if len(ok) >= 2:
        ref = ok.get("hf_peft") or next(iter(ok.values()))
        lines.append(f"step-0 loss minus {ref['impl']}'s ({ref['loss_step0']:.5f}): " + ", ".join(
            f"{r['impl']} {r['loss_step0'] - ref['loss_step0']:+.2e}" for r in ok.values() if r is not ref))
        prints = {r["fingerprint"] for r in ok.values()}
        counts = {sum(r["real_tokens_per_step"]) for r in ok.values()}
        lines.append("same samples for every impl: " + ("yes" if len(prints) == 1 and len(counts) == 1
                                                          else f"NO (fingerprints {prints}, real tokens {counts})"))
    ours = ok.get("sloth")
    if ours:
        targets = [("hf_peft", 2.0), ("unsloth", 1.0), ("unsloth_packed", 1.0)]
        lines.append("target sloth (padding-free): " + "; ".join(
            f">= {need:g}x {name}: {ours['real_tok_s'] / ok[name]['real_tok_s']:.2f}x "
            f"{'met' if ours['real_tok_s'] >= need * ok[name]['real_tok_s'] else 'NOT met'}"
            for name, need in targets if name in ok) or "no baseline finished")
    return lines


def plot(results: List[dict], path: Path, title: str):
    ok = [r for r in results if r.get("ok")]
    if not ok:
        return None
    panels = [{"title": "throughput", "ylabel": "tokens/s",
               "groups": {r["impl"]: {"real tok/s": r["real_tok_s"], "processed tok/s": r["processed_tok_s"]}
                          for r in ok}}]
    if any(r.get("peak_mem_gib") for r in ok):
        panels.append({"title": "peak memory", "ylabel": "GiB (max_memory_allocated)",
                       "groups": {r["impl"]: {"GiB": r["peak_mem_gib"]} for r in ok}})
    return C.plot_panels(path, panels, title)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 (fp32 for --smoke)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps after the warmup")
    p.add_argument("--samples-per-step", type=int, default=None, help="default 48 (llama-1b), 12 (llama-8b)")
    p.add_argument("--tokens-per-step", type=int, default=0,
                   help="fill each step greedily with samples up to this many real tokens (overrides the above)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="samples per padded micro-batch (0: the whole step in one padded batch); "
                        "default 8 (llama-1b), 4 (llama-8b)")
    p.add_argument("--mean-len", type=float, default=350.0)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal shape: larger, longer tail")
    p.add_argument("--grad-ckpt", type=int, default=1)
    p.add_argument("--autocast", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-flops", type=float, default=790e12, help="MFU denominator (dense bf16 FLOP/s)")
    p.add_argument("--unsloth-gc", default="unsloth", choices=["unsloth", "true"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b", choices=["llama-1b", "llama-8b", "tiny"])
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, run in this order")
    add_data_args(p)
    p.add_argument("--model-dir", default=None, help="default <tmp>/sloth_bench_models/<model>-<dtype> (as e2e.py)")
    p.add_argument("--recreate", action="store_true")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (a temp folder under --smoke)")
    p.add_argument("--name", default=None, help="result name; default padding_free_<model>")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds per worker process before it is killed")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="start no further implementation once this much time has passed (0: no limit)")
    p.add_argument("--verbose", action="store_true", help="echo every line the workers print")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, fp32, CPU, hf_peft + sloth + sloth_padded, 1 + 2 steps, lengths 4..64")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device = "tiny", "cpu"
        args.dtype = args.dtype or "fp32"
        args.impls = ",".join(i for i in args.impls.split(",") if i in ("hf_peft", "sloth", "sloth_padded"))
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        args.mean_len, args.min_len, args.max_len = 20.0, 4, 64
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be at least 1 and --warmup at least 0")
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or "bf16"
    samples, micro = DEFAULTS[args.model]
    args.samples_per_step = args.samples_per_step or samples
    args.micro_batch = micro if args.micro_batch is None else args.micro_batch
    tmp = Path(tempfile.gettempdir())
    args.model_dir = args.model_dir or str(tmp / "sloth_bench_models" / f"{args.model}-{args.dtype}")
    args.out_dir = args.out_dir or str((tmp / "sloth_bench_smoke") if args.smoke else C.RESULTS_DIR)
    args.name = args.name or f"padding_free_{args.model}"
    return args


def worker_main(argv) -> None:
    p = argparse.ArgumentParser(description="one padding-free benchmark step loop (see padding_free.py)")
    p.add_argument("--impl", required=True, choices=IMPLS)
    p.add_argument("--dir", required=True)
    add_data_args(p)
    args = p.parse_args(argv)
    args.dtype = args.dtype or "bf16"
    worker(args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        worker_main(argv[1:])
        return 0
    args = parse_args(argv)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"unknown impl(s) {unknown}; choose from {IMPLS}")
    plan = plan_steps(args)
    data = dataset_summary(args, plan)
    start = time.perf_counter()
    per_step = (f"{args.tokens_per_step} real tokens a step" if args.tokens_per_step
                else f"{args.samples_per_step} samples a step")
    print(f"{args.name}: {args.model}, {args.dtype}, {per_step}, padded micro-batches of "
          f"{args.micro_batch or 'the whole step'}, {args.warmup} warmup + {args.steps} timed steps, "
          f"device {args.device}, impls {impls}", flush=True)
    print(f"data: {data['distribution']}; {data['samples']} samples: mean {data['mean']:.1f}, median "
          f"{data['median']:.0f}, p95 {data['p95']}, max {data['max']} ({data['at_max']} at the cap), "
          f"min {data['min']}")
    real, padded = data["real_tokens_per_step"], data["padded_tokens_per_step"]
    print(f"data: real tokens a step {min(real)}..{max(real)} (mean {statistics.fmean(real):,.0f}); padded "
          f"{min(padded)}..{max(padded)}; padding {100 * data['padding_frac']:.1f}% with these micro-batches, "
          f"{100 * data['padding_frac_whole_step']:.1f}% padding whole steps", flush=True)
    work = Path(tempfile.gettempdir()) / "sloth_bench_work"
    out_dir = Path(args.out_dir)
    payload = {"config": vars(args), "model": E2E.ensure_model(args, work), "dataset": data, "results": []}
    progress = C.Progress(total=len(impls) * (args.warmup + args.steps), desc=args.name)
    E2E.run_each(impls, args, start, payload, out_dir / f"{args.name}.json", progress,
                 missing=lambda impl: missing_modules(impl, args.device),
                 run=lambda impl: run_impl(impl, args, work, progress),
                 done=lambda r: (f"{r['real_tok_s']:,.0f} real tok/s ({100 * r['padding_frac']:.0f}% padding), "
                                 f"peak {C.fmt(r['peak_mem_gib'], 2)} GiB, loss {r['loss_step0']:.5f} -> "
                                 f"{r['loss_final']:.5f}, wall {r['wall_s']:.0f} s"))
    progress.close()
    payload["total_s"] = time.perf_counter() - start
    payload["verdict"] = verdict_lines(payload["results"])
    path = C.write_json(out_dir / f"{args.name}.json", payload)
    print()
    print(summary_table(payload["results"]))
    print("real = non-pad tokens; MFU on real tokens: (4*N_matmul*tokens + 6*L*d*sum(len^2)) / time / "
          f"{args.peak_flops:g}")
    for line in payload["verdict"]:
        print(line)
    png = plot(payload["results"], out_dir / f"{args.name}.png",
               f"{args.name}: {per_step}, mean len {data['mean']:.0f}, LoRA r16, {args.device}")
    print(f"wrote {path}" + (f" and {png}" if png else "") + f" in {payload['total_s']:.0f} s")
    failed = [r for r in payload["results"] if not r.get("ok") and not r.get("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
