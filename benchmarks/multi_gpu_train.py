"""One training run on 1 or 2 GPUs for issue 7 (scale-out); driven by benchmarks/multi_gpu.sh.

    python benchmarks/multi_gpu_train.py run --framework lightning --engine single --tag parity ...
    torchrun --nproc_per_node 2 benchmarks/multi_gpu_train.py run --framework lightning --engine ddp ...
    python benchmarks/multi_gpu_train.py report RESULTS.jsonl [--tag parity]

Frameworks and engines (``--engine single`` runs as one process, the others under torchrun):
    lightning  single | ddp | fsdp    sloth.SlothStrategy(kind); fsdp = Lightning's FSDPStrategy
               | fsdp2                (FSDP1, decoder layers wrapped, use_orig_params); fsdp2 =
                                      ModelParallelStrategy + fully_shard per decoder layer
    hf         single | ddp | fsdp2   Trainer + SlothCallback; fsdp2 = accelerate FSDP2 through
                                      TrainingArguments(fsdp=..., fsdp_config={"version": 2})

The model is a random-init Llama built in each process from a seed (nothing read or written on
disk), LoRA r16 on q,k,v,o,gate,up,down. Data:
    --data text    the instruction set shipped with the package (sloth_plugins/data), tokenized by a tokenizer trained
                   here, padded per batch (labels -100 on padding): real text, so the loss moves
    --data random  random token ids, every row exactly --seq long (throughput)
The global batch is the same whatever the world size: --global-batch rows per step, split over
the ranks, in order (no shuffling), so step k sees the same rows on 1 and on 2 GPUs. Every rank's
loss is its label tokens' sum over the label tokens of all ranks (HF: average_tokens_across_devices;
Lightning: an all_gather in training_step), so the logged loss is the global batch's mean.

Rank 0 appends one JSON line per run to --out: the per-step global losses, steady tokens/s (all
GPUs, after --warmup steps), seconds per step, peak allocated memory per GPU (from the start of
training, weights included), the PatchReport summary, versions. ``report`` prints the parity
table (each run against the single-GPU run of its framework and tag) and the scaling table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import _common as C  # noqa: E402,I001  (keeps benchmarks/ off sys.path, registers slothbench)

_HERE = C.HERE
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

# "small" here; every other shape (llama-8b = llama-3.1-8b, any family) from slothbench.models.SHAPES
SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
ENGINES = {"lightning": ("single", "ddp", "fsdp", "fsdp2"), "hf": ("single", "ddp", "fsdp2")}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _device():
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ---------------------------------------------------------------------------------------- model, data

def build_model(args, vocab_size: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from slothbench.models import build_config, lora_targets
    from transformers import AutoModelForCausalLM, LlamaConfig
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if args.shape == "small":
        try:
            config = LlamaConfig(**SMALL, **special, vocab_size=vocab_size,
                                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
        except TypeError:                                   # transformers < 5
            config = LlamaConfig(**SMALL, **special, vocab_size=vocab_size, rope_theta=500000.0)
    else:
        config = build_config(args.shape, **special)
    torch.manual_seed(args.seed)
    with torch.device(_device()):
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(args.dtype), attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(args.seed + 1)
    # adapters in the model's dtype: FSDP1 flattens a layer's parameters into one tensor of one dtype
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=lora_targets(config.model_type),
                                            task_type="CAUSAL_LM"), autocast_adapter_dtype=False)


def build_rows(args):
    """(rows, vocab_size): the rows of the whole run, in order."""
    import torch
    n = args.global_batch * args.steps
    if args.data == "random":
        from slothbench.models import build_config
        vocab = 32000 if args.shape == "small" else build_config(args.shape).vocab_size
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(3, vocab, (n, args.seq), generator=g)
        return [dict(input_ids=r) for r in ids], vocab
    from sloth_plugins.testing import format_example, load_instructions, train_tokenizer
    texts = [format_example(r) for r in load_instructions()]
    tok = train_tokenizer(texts)
    texts = (texts * (n // len(texts) + 1))[:n]
    rows = [dict(input_ids=torch.tensor(tok(t + tok.eos_token, truncation=True, max_length=args.seq)["input_ids"]))
            for t in texts]
    return rows, len(tok)


class Meter:
    """Step times (device-synchronised) and the peak memory of this process' GPU. With
    ``profile_last`` > 0 the last that many of ``steps`` steps run under torch.profiler and are
    left out of the timings; ``profile`` is then their device time per kernel category."""

    def __init__(self, steps: int = 0, profile_last: int = 0):
        self.times, self._t0, self.wrapped = [], None, None
        self.profile, self._prof, self._step = None, None, 0
        self._profile_from = steps - profile_last if profile_last else None
        self._profile_n = profile_last

    def start_training(self):
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def step_begin(self):
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self._step == self._profile_from and torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile
            self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._prof.__enter__()
        self._t0 = time.perf_counter()

    def step_end(self):
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._step += 1
        if self._t0 is not None and self._prof is None:
            self.times.append(time.perf_counter() - self._t0)
        self._t0 = None
        if self._prof is not None and self._step == self._profile_from + self._profile_n:
            self._prof.__exit__(None, None, None)
            self.profile = _summarize_profile(self._prof, self._profile_n, self.times)
            self._prof = None

    @staticmethod
    def peak_gib():
        import torch
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _summarize_profile(prof, n_steps: int, times) -> dict:
    """Device time per kernel category of the profiled steps (slothbench.profile's categories, NCCL included)."""
    from slothbench.profile import CUDA_SOURCE, cuda_records, summarize_profile
    step_s = sorted(times)[len(times) // 2] if times else None      # the unprofiled median step
    return summarize_profile(cuda_records(prof), n_steps, step_s, CUDA_SOURCE)


# ---------------------------------------------------------------------------------------- frameworks

def run_lightning(args, rows, vocab):
    import lightning as L
    import torch

    import sloth_plugins as sloth
    from sloth_plugins.testing import right_pad_collate

    world, meter = _world(), Meter(args.steps, args.profile)

    class LoRAModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.losses = build_model(args, vocab), []

        def on_train_start(self):
            meter.start_training()

        def on_train_batch_start(self, batch, batch_idx):
            meter.step_begin()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            meter.step_end()

        def training_step(self, batch, batch_idx):
            tokens = (batch["labels"][:, 1:] != -100).sum()
            all_tokens = self.all_gather(tokens).sum()
            loss = self.model(**batch, num_items_in_batch=all_tokens).loss
            self.losses.append(self.all_gather(loss.detach()).sum().item())   # the global batch's mean
            return loss * self.trainer.world_size          # DDP/FSDP average gradients over ranks

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=args.lr)

    options = dict(gradient_checkpointing=args.grad_ckpt, verbose=False)
    if args.engine == "fsdp":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        options["auto_wrap_policy"] = {LlamaDecoderLayer}
    strategy = sloth.SlothStrategy(args.engine, **options)
    sampler = torch.utils.data.DistributedSampler(rows, num_replicas=world, rank=_rank(), shuffle=False)
    loader = torch.utils.data.DataLoader(rows, batch_size=args.global_batch // world, sampler=sampler,
                                         collate_fn=right_pad_collate)
    precision = "bf16-true" if args.dtype == "bf16" else "32-true"
    trainer = L.Trainer(strategy=strategy, accelerator="gpu" if _device().type == "cuda" else "cpu", devices=world,
                        num_nodes=1, max_steps=args.steps, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    module = LoRAModule()
    trainer.fit(module, loader)
    meter.wrapped = type(trainer.strategy.model).__name__
    if args.engine == "fsdp2":       # fully_shard swaps the class of the model it shards, not the module's
        meter.wrapped += f" > model {type(module.model).__name__}"
    return module.losses, meter, trainer.strategy.sloth_report


def run_hf(args, rows, vocab):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import sloth_plugins as sloth
    from sloth_plugins.testing import right_pad_collate

    world, meter, losses = _world(), Meter(args.steps, args.profile), []

    class Measure(TrainerCallback):
        def on_train_begin(self, *a, **k):
            meter.start_training()

        def on_step_begin(self, *a, **k):
            meter.step_begin()

        def on_step_end(self, *a, **k):
            meter.step_end()

        def on_log(self, args_, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    extra = {}
    if args.engine == "fsdp2":
        extra = dict(fsdp="full_shard auto_wrap",
                     fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                  "reshard_after_forward": True})
    cuda = _device().type == "cuda"
    targs = TrainingArguments(
        output_dir=os.path.join(args.workdir, f"hf-{args.engine}-{world}"), max_steps=args.steps,
        per_device_train_batch_size=args.global_batch // world, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
        train_sampling_strategy="sequential", average_tokens_across_devices=True, disable_tqdm=True,
        bf16=args.dtype == "bf16" and cuda, use_cpu=not cuda, ddp_find_unused_parameters=False if world > 1 else None,
        ddp_backend=None if cuda or world == 1 else "gloo", **extra)
    callback = sloth.SlothCallback(gradient_checkpointing=args.grad_ckpt, verbose=False)
    trainer = Trainer(model=build_model(args, vocab), args=targs, train_dataset=rows, data_collator=right_pad_collate,
                      callbacks=[callback, Measure()])
    trainer.train()
    from sloth_plugins.models import resolve_causal_lm
    meter.wrapped = (f"{type(trainer.model_wrapped).__name__}, lm_head weight "
                     f"{type(resolve_causal_lm(trainer.model).lm_head.weight).__name__}")
    return losses, meter, callback.report


# ---------------------------------------------------------------------------------------- run, report

def _versions():
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "lightning", "sloth_plugins"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _all_ranks(value):
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def run(args):
    if args.engine not in ENGINES[args.framework]:
        raise SystemExit(f"--engine for {args.framework}: {', '.join(ENGINES[args.framework])}")
    if args.global_batch % _world():
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {_world()} ranks")
    if (args.engine == "single") != (_world() == 1):
        raise SystemExit(f"--engine {args.engine} with WORLD_SIZE={_world()}: single runs as one process, "
                         f"the others under torchrun --nproc_per_node 2")
    rows, vocab = build_rows(args)
    started = time.perf_counter()
    losses, meter, report = (run_lightning if args.framework == "lightning" else run_hf)(args, rows, vocab)
    import torch
    peaks = _all_ranks(meter.peak_gib())
    profiles = _all_ranks(meter.profile) if args.profile else None
    steady = meter.times[args.warmup:] or meter.times
    tokens_per_step = args.global_batch * args.seq if args.data == "random" else None
    if _rank() != 0:
        return
    row = dict(tag=args.tag, framework=args.framework, engine=args.engine, world=_world(), shape=args.shape,
               dtype=args.dtype, data=args.data, global_batch=args.global_batch,
               per_gpu_batch=args.global_batch // _world(),
               seq=args.seq, steps=len(losses), warmup=args.warmup, grad_ckpt=args.grad_ckpt, losses=losses,
               s_per_step=round(sum(steady) / len(steady), 4) if steady else None,
               tokens_per_s=(round(tokens_per_step * len(steady) / sum(steady), 1)
                             if tokens_per_step and steady else None),
               peak_gib_per_gpu=peaks, wall_s=round(time.perf_counter() - started, 1), wrapped=meter.wrapped,
               gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               profile_per_rank=profiles,
               sloth={k: v["how"] + v["why"] for k, v in report.summary().items()} if report else None,
               versions=_versions())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print("MGPU " + json.dumps({k: row[k] for k in ("tag", "framework", "engine", "world", "tokens_per_s",
                                                       "s_per_step", "peak_gib_per_gpu", "wrapped")}), flush=True)
    print(f"losses: {[round(x, 5) for x in losses]}", flush=True)
    for rank, prof in enumerate(profiles or []):
        if prof:
            cats = ", ".join(f"{c['category']} {c['ms_per_step']:.1f}" for c in prof["categories"])
            print(f"profile rank {rank}: step {prof['step_ms']:.1f} ms, device busy "
                  f"{prof['device_busy']['ms_per_step']:.1f}, idle {prof.get('device_idle', {}).get('ms_per_step')}"
                  f" ms; {cats}", flush=True)
            for k in prof["top_kernels"][:8]:
                print(f"    {k['ms_per_step']:8.2f} ms  x{k['calls_per_step']:g}  {k['name'][:110]}", flush=True)


def report(args):
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    if args.tag:
        rows = [r for r in rows if r["tag"] in args.tag]
    failed = False
    for tag in dict.fromkeys(r["tag"] for r in rows):
        group = [r for r in rows if r["tag"] == tag]
        print(f"\n== {tag}")
        print(f"{'framework':<10}{'engine':<8}{'GPUs':>5}{'steps':>6}{'step-0 loss':>13}{'last loss':>11}"
              f"{'max rel diff':>14}{'tokens/s':>11}{'x 1 GPU':>9}{'s/step':>8}  peak GiB per GPU  (wrapped as)")
        for i, r in enumerate(group):
            # the latest 1-GPU run of the same framework before this one (a phase run again appends)
            base = None if r["world"] == 1 else next(
                (b for b in reversed(group[:i]) if b["framework"] == r["framework"] and b["world"] == 1), None)
            diff, speed = "-", "-"
            if base is not None and r["global_batch"] != base["global_batch"]:
                diff = "other batch"          # scaling runs: the same batch per GPU, not the same global batch
            elif base is not None:
                n = min(len(base["losses"]), len(r["losses"]))
                rel = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"][:n], base["losses"][:n])),
                          default=float("nan"))
                ok = n == len(base["losses"]) and rel <= args.tolerance
                failed |= not ok
                diff = f"{rel:.1e} {'ok' if ok else 'FAIL'}"
            if base is not None and r.get("tokens_per_s") and base.get("tokens_per_s"):
                speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}"
            losses = r["losses"] or [float("nan")]
            tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
            sps = f"{r['s_per_step']:.3f}" if r.get("s_per_step") else "-"
            print(f"{r['framework']:<10}{r['engine']:<8}{r['world']:>5}{len(r['losses']):>6}{losses[0]:>13.5f}"
                  f"{losses[-1]:>11.5f}{diff:>14}{tps:>11}{speed:>9}{sps:>8}  {r['peak_gib_per_gpu']}"
                  f"  ({r.get('wrapped') or '-'})")
    print(f"\n(max rel diff: the largest relative difference of the per-step global loss from the latest 1-GPU run "
          f"of the same framework and tag before it; ok at <= {args.tolerance:g})")
    return 1 if failed and args.strict else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one training run (rank 0 appends a JSON line to --out)")
    r.add_argument("--framework", required=True, choices=sorted(ENGINES))
    r.add_argument("--engine", required=True)
    r.add_argument("--tag", default="run", help="groups runs in the report (e.g. parity, scale)")
    r.add_argument("--shape", default="small", help="small, or a slothbench.models shape (llama-8b, qwen3-8b, ...)")
    r.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    r.add_argument("--data", default="text", choices=["text", "random"])
    r.add_argument("--global-batch", default=8, type=int, help="rows per step, all GPUs together")
    r.add_argument("--seq", default=256, type=int, help="max tokens per row (random data: exactly)")
    r.add_argument("--steps", default=20, type=int)
    r.add_argument("--warmup", default=3, type=int, help="steps left out of tokens/s")
    r.add_argument("--lr", default=1e-3, type=float)
    r.add_argument("--grad-ckpt", default="auto", choices=["auto", "offload", "recompute", "off"])
    r.add_argument("--profile", default=0, type=int,
                   help="profile the last N of --steps on every rank (left out of tokens/s): device time per category")
    r.add_argument("--seed", default=0, type=int)
    r.add_argument("--workdir", default="/tmp/sloth-multi-gpu")
    r.add_argument("--out", default="benchmarks/results/multi_gpu.jsonl")
    p = sub.add_parser("report", help="parity and scaling tables from a results file")
    p.add_argument("results")
    p.add_argument("--tag", action="append", help="only these tags (repeatable)")
    p.add_argument("--tolerance", default=1e-3, type=float)
    p.add_argument("--strict", action="store_true", help="exit 1 when a parity check fails")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        sys.exit(report(args))


if __name__ == "__main__":
    main()
