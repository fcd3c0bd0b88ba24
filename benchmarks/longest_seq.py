"""Longest sequence that trains (batch 1) within a memory budget, per implementation (issue 5).

    python benchmarks/longest_seq.py --model llama-8b                            # 80 GiB, all four
    python benchmarks/longest_seq.py --model llama-8b --impls sloth_offload,sloth_auto
    python benchmarks/longest_seq.py --smoke                                      # tiny model on CPU: the loop only

Implementations, each in its own process that loads the model once:
  hf_peft        transformers + PEFT, HF gradient_checkpointing_enable() (non-reentrant)
  unsloth        Unsloth, use_gradient_checkpointing="unsloth" (its offloaded checkpointing)
  sloth_offload  HF + PEFT + sloth_plugins.patch(SlothConfig(gradient_checkpointing="offload"))
  sloth_auto     HF + PEFT + sloth_plugins.patch(SlothConfig(gradient_checkpointing="auto",
                 memory_budget_gb=--budget-gib))
Each process caps PyTorch's CUDA caching allocator at --budget-gib GiB
(torch.cuda.set_per_process_memory_fraction), loads the random-init model folder benchmarks/e2e.py
uses (created if missing), LoRA r16 alpha 16 on the 7 linear layers, bf16 autocast, AdamW, and
tries sequence lengths (batch 1, multiples of --resolution): doubling from --start-seq until one
fails or --max-seq trains, then bisection between the longest that trained and the shortest that
failed down to --resolution, while its time budget lasts (no new try starts after it; the try
running then finishes). A try is one forward + backward + optimizer step; sloth_auto steps until
its plan is settled (at most --auto-max-steps: its first step at a new length measures). A try
fails on torch.cuda.OutOfMemoryError, or when the allocator reserved more than the budget anyway
(checked after every try). Between tries the step's tensors, gradients and cached blocks are freed
(Unsloth's offloading buffers reset) and the peak counters restarted. Per try: length, ok / oom /
over, step seconds, peak allocated and reserved GiB.

The 8B config says max_position_embeddings 8192. The search loads the model through a folder
beside it (symlinks to the same weight files, a config with max_position_embeddings = --max-seq),
so no library applies RoPE scaling for long inputs; with the default rope type HF computes cos/sin
from the positions, so the numbers do not change.

Writes <out>/longest_seq_<model>[_qlora].json (results of implementations not run this time are
kept from an earlier file with the same settings) and a PNG beside it, and one log per impl.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (first: keeps benchmarks/ off sys.path)

import argparse
import gc
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, List

IMPLS = {
    "hf_peft": dict(base="hf_peft", sloth=None),
    "unsloth": dict(base="unsloth", sloth=None),
    "sloth_offload": dict(base="sloth", sloth={"gradient_checkpointing": "offload"}),
    "sloth_auto": dict(base="sloth", sloth={"gradient_checkpointing": "auto"}),     # + memory_budget_gb
}
GiB = 2 ** 30
# out-of-memory raised as a plain RuntimeError: a library's own cudaMalloc, a cuBLAS workspace
_OOM_TEXT = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation", re.IGNORECASE)


def _load(name: str):
    """A sibling script as a module (benchmarks/ is kept off sys.path, see _common)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, C.HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ the search

def search_longest(try_seq: Callable[[int], bool], start: int, max_seq: int, resolution: int,
                   time_left: Callable[[], float]) -> dict:
    """Longest multiple of ``resolution`` up to ``max_seq`` for which ``try_seq`` is True, assuming
    every shorter one works too: doubling from ``start``, then bisection. No try starts once
    ``time_left()`` is <= 0."""
    max_seq = max(resolution, max_seq // resolution * resolution)
    seq = max(resolution, min(start, max_seq) // resolution * resolution)
    ok, fail, stopped = 0, None, None
    while True:
        if time_left() <= 0:
            stopped = "time budget"
            break
        if not try_seq(seq):
            fail = seq
            break
        ok = seq
        if seq >= max_seq:
            break
        seq = min(2 * seq, max_seq)
    while stopped is None and fail is not None and fail - ok > resolution:
        if time_left() <= 0:
            stopped = "time budget"
            break
        mid = (ok + fail) // 2 // resolution * resolution      # strictly between: both are multiples
        if try_seq(mid):
            ok = mid
        else:
            fail = mid
    return {"longest_ok": ok or None, "shortest_fail": fail, "max_seq": max_seq, "reached_max": ok == max_seq,
            "bracket": (fail - ok) if fail is not None else None, "stopped": stopped}


# ------------------------------------------------------------------------------------ the worker

def worker(a) -> None:
    if IMPLS[a.impl]["base"] == "unsloth":
        import unsloth  # noqa: F401  (must precede transformers/peft imports)
    import torch
    W = _load("e2e_worker")
    device, dtype = W._device(a.device), W._dtype(a.dtype)
    cuda = device.type == "cuda"
    cap = None
    if cuda and a.budget_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, a.budget_gib * GiB / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        cap = {"budget_gib": a.budget_gib, "fraction": fraction, "device_total_gib": total / GiB}
    spec = IMPLS[a.impl]
    if spec["sloth"] is not None:
        options = dict(spec["sloth"])
        if options["gradient_checkpointing"] == "auto" and a.budget_gib:
            options["memory_budget_gb"] = a.budget_gib
        os.environ["SLOTH_BENCH_CONFIG"] = json.dumps(options)      # read by e2e_worker._load_hf
    ns = SimpleNamespace(impl=spec["base"], dir=a.dir, qlora=bool(a.qlora), grad_ckpt=True, lora_r=16, lora_alpha=16,
                         seed=a.seed, unsloth_gc="unsloth", seq_len=a.max_seq)
    t0 = time.perf_counter()
    if spec["base"] == "unsloth":
        model, info = W._load_unsloth(ns, device, dtype)
    else:
        model, info = W._load_hf(ns, device, dtype)
        model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    controller, reset_unsloth = None, None
    if spec["base"] == "unsloth":
        try:    # its offloaded checkpointing keeps global buffers and step state: each try starts afresh
            from unsloth_zoo.gradient_checkpointing import reset_unsloth_gradient_checkpointing_buffers as reset_unsloth
        except ImportError:
            pass
    if spec["base"] == "sloth":
        from sloth_plugins import get_checkpoint_controller
        controller = get_checkpoint_controller(model)
    vocab = json.loads((Path(a.dir) / "config.json").read_text())["vocab_size"]
    memory = W.PeakMemory(device)
    if cuda:
        torch.cuda.synchronize(device)
        info["model_mem_gib"] = torch.cuda.memory_allocated(device) / GiB
    W.emit("loaded", impl=a.impl, load_s=round(time.perf_counter() - t0, 1), cap=cap,
           alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), trainable_params=sum(p.numel() for p in trainable),
           **info)
    use_autocast = dtype in (torch.bfloat16, torch.float16)
    auto = controller is not None and controller.auto
    tries: List[dict] = []

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def try_seq(seq: int) -> bool:
        ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(a.seed + seq)).to(device)
        loss, times, status, error, loss_value = None, [], "ok", None, None
        memory.mark()
        try:
            for _ in range(a.auto_max_steps if auto else 1):
                decisions = controller.decisions if controller is not None else None
                sync()
                t = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
                    loss = model(input_ids=ids, labels=ids).loss
                if a.fake_oom_above and seq > a.fake_oom_above:       # --smoke: the OOM path on CPU
                    raise torch.cuda.OutOfMemoryError(f"simulated out of memory above {a.fake_oom_above} tokens")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                times.append(time.perf_counter() - t)
                loss_value, loss = float(loss.detach().float()), None
                if not auto or (controller.settled and controller.decisions == decisions):
                    break
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and not _OOM_TEXT.search(message):
                raise
            status, error = "oom", message
        # outside the except clause: its traceback, and the frames holding the step's tensors, are gone
        loss = ids = None
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        if reset_unsloth is not None:
            reset_unsloth()
        gc.collect()
        if cuda:
            sync()
            torch.cuda.empty_cache()
        peak, reserved = memory.window_peak(), memory.window_peak(reserved=True)
        if status == "ok" and cap is not None and reserved is not None and reserved > a.budget_gib * GiB:
            status, error = "over", f"no OOM, but {reserved / GiB:.2f} GiB reserved > {a.budget_gib} GiB"
        row = {"seq": seq, "status": status, "step_s": times[-1] if times else None, "steps": len(times),
               "peak_gib": peak / GiB if peak is not None else None,
               "reserved_gib": reserved / GiB if reserved is not None else None, "loss": loss_value, "error": error}
        if controller is not None and getattr(controller, "plan", None) is not None:
            row["plan"] = controller.plan.summary()
        tries.append(row)
        W.emit("try", impl=a.impl, **row)
        return status == "ok"

    started = time.perf_counter()
    found = search_longest(try_seq, a.start_seq, a.max_seq, a.resolution,
                           lambda: a.search_budget_s - (time.perf_counter() - started))
    best = next((t for t in tries if t["seq"] == found["longest_ok"] and t["status"] == "ok"), None)
    W.emit("result", impl=a.impl, ok=True, **found, search_s=time.perf_counter() - started, tries=tries,
           peak_gib_at_longest=best["peak_gib"] if best else None, step_s_at_longest=best["step_s"] if best else None,
           tok_s_at_longest=best["seq"] / best["step_s"] if best and best["step_s"] else None)


# ------------------------------------------------------------------------------------ the driver

def long_context_view(model_dir: Path, max_seq: int) -> Path:
    """The model folder itself when its config allows ``max_seq`` positions, else a sibling with
    symlinks to its files and a config saying max_position_embeddings = max_seq."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("max_position_embeddings", 0) >= max_seq:
        return model_dir
    view = model_dir.with_name(f"{model_dir.name}-maxpos{max_seq}")
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and f.is_file():
            (view / f.name).symlink_to(f.resolve())
    cfg["max_position_embeddings"] = max_seq
    (view / "config.json").write_text(json.dumps(cfg, indent=2))
    return view


def run_impl(impl: str, args, model_dir: Path, search_budget_s: float, timeout_s: float, work: Path) -> dict:
    E = _load("e2e")
    spec = IMPLS[impl]
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--impl", impl, "--dir", str(model_dir),
           "--device", args.device, "--dtype", args.dtype, "--budget-gib", str(args.budget_gib),
           "--max-seq", str(args.max_seq), "--start-seq", str(args.start_seq), "--resolution", str(args.resolution),
           "--search-budget-s", str(search_budget_s), "--auto-max-steps", str(args.auto_max_steps),
           "--qlora", str(int(args.qlora)), "--seed", str(args.seed), "--fake-oom-above", str(args.fake_oom_above)]
    state = {"loaded": None, "result": None, "tries": []}
    t0 = time.perf_counter()

    def on_event(e: dict) -> None:
        if e["event"] == "loaded":
            state["loaded"] = {k: v for k, v in e.items() if k != "event"}
            print(f"  [{impl}] loaded in {e['load_s']:.0f} s"
                  + (f", weights {e['model_mem_gib']:.1f} GiB" if e.get("model_mem_gib") else "")
                  + (f", allocator capped at {e['cap']['budget_gib']:g} GiB of {e['cap']['device_total_gib']:.0f}"
                     if e.get("cap") else ", no memory cap (no CUDA)"), flush=True)
        elif e["event"] == "try":
            row = {k: v for k, v in e.items() if k not in ("event", "impl")}
            state["tries"].append(row)
            print(f"  [{impl}] seq {row['seq']:>7,}  {row['status']:<4}  step {C.fmt(row['step_s'], 2)} s"
                  f" ({row['steps']} step{'s' if row['steps'] != 1 else ''})  peak {C.fmt(row['peak_gib'], 2)} GiB"
                  f"  reserved {C.fmt(row['reserved_gib'], 2)} GiB"
                  + (f"  plan {row['plan']}" if row.get("plan") else "")
                  + (f"  [{row['error'][:100]}]" if row.get("error") else ""), flush=True)
        elif e["event"] == "result":
            state["result"] = {k: v for k, v in e.items() if k != "event"}
    env = E.worker_env(args.smoke)
    if args.alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
    res = E.stream_worker(cmd, Path(args.out_dir) / f"{args.name}_{impl}.log", timeout_s, on_event, args.verbose,
                          work / impl, env)
    out = {"impl": impl, "sloth_config": spec["sloth"], "wall_s": time.perf_counter() - t0,
           "loaded": state["loaded"]}
    if state["result"] is not None:
        out.update(state["result"])
        if res["rc"] != 0:
            out["exit_code"] = res["rc"]
        return out
    why = "timed out" if res["timed_out"] else f"exit code {res['rc']}"
    print(f"  [{impl}] FAILED ({why}); last lines:\n" + "\n".join("    | " + l for l in res["tail"][-25:]), flush=True)
    ok = [t["seq"] for t in state["tries"] if t["status"] == "ok"]
    bad = [t["seq"] for t in state["tries"] if t["status"] != "ok"]
    return {**out, "ok": False, "error": why, "tail": res["tail"][-25:], "tries": state["tries"],
            "longest_ok": max(ok) if ok else None, "shortest_fail": min(bad) if bad else None}


def summary_table(results: List[dict]) -> str:
    rows = []
    for r in results:
        if r.get("skipped"):
            rows.append([r["impl"], "skipped", "-", "-", "-", "-", "-", r["skipped"]])
            continue
        best = next((t for t in r.get("tries", []) if t["seq"] == r.get("longest_ok") and t["status"] == "ok"), {})
        note = r.get("error") or r.get("stopped") or ("reached --max-seq" if r.get("reached_max") else "")
        rows.append([r["impl"], C.fmt(r.get("longest_ok")), C.fmt(r.get("shortest_fail")),
                     C.fmt(best.get("peak_gib"), 2), C.fmt(best.get("reserved_gib"), 2), C.fmt(best.get("step_s"), 2),
                     str(len(r.get("tries", []))), note])
    return C.text_table(["impl", "longest ok", "shortest fail", "peak GiB", "reserved GiB", "step s", "tries", "note"],
                        rows)


SAME_SETTINGS = ("model", "budget_gib", "max_seq", "resolution", "qlora", "dtype", "alloc_conf", "auto_max_steps")


def merged_results(path: Path, args, fresh: List[dict]) -> List[dict]:
    """This run's results plus, from an earlier file with the same settings, the other impls'."""
    if args.fresh or not path.exists():
        return fresh
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return fresh
    if any(old.get("config", {}).get(k) != getattr(args, k) for k in SAME_SETTINGS):
        return fresh
    ran = {r["impl"] for r in fresh}
    kept = [dict(r, from_earlier_run=old.get("meta", {}).get("date", True)) for r in old.get("results", [])
            if r["impl"] not in ran and not r.get("skipped")]
    order = list(IMPLS)
    return sorted(kept + fresh, key=lambda r: order.index(r["impl"]) if r["impl"] in order else len(order))


def parse_worker_args(argv: List[str]):
    w = argparse.ArgumentParser(prog="longest_seq.py worker",
                                description="one implementation's search (run by the driver)")
    w.add_argument("--impl", required=True, choices=list(IMPLS))
    w.add_argument("--dir", required=True)
    w.add_argument("--device", default="auto")
    w.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    w.add_argument("--budget-gib", type=float, default=80.0)
    w.add_argument("--max-seq", type=int, required=True)
    w.add_argument("--start-seq", type=int, required=True)
    w.add_argument("--resolution", type=int, required=True)
    w.add_argument("--search-budget-s", type=float, required=True)
    w.add_argument("--auto-max-steps", type=int, default=3)
    w.add_argument("--qlora", type=int, default=0)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--fake-oom-above", type=int, default=0)
    return w.parse_args(argv)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-8b", choices=["llama-8b", "llama-1b", "tiny"])
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--budget-gib", type=float, default=80.0,
                   help="cap on the CUDA caching allocator (and sloth_auto's memory_budget_gb)")
    p.add_argument("--max-seq", type=int, default=131072)
    p.add_argument("--start-seq", type=int, default=8192)
    p.add_argument("--resolution", type=int, default=1024, help="lengths tried are multiples of this")
    p.add_argument("--impl-budget-s", type=float, default=150.0,
                   help="per implementation: no new try starts after this many seconds of searching")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="whole run: start no implementation after this, and cap each one's search to what is left "
                        "(0: no limit)")
    p.add_argument("--auto-max-steps", type=int, default=3,
                   help="sloth_auto: steps per try at most (it measures at a new length, then plans)")
    p.add_argument("--alloc-conf", default="expandable_segments:True",
                   help="PYTORCH_CUDA_ALLOC_CONF for every worker, the same for all ('' leaves the environment's)")
    p.add_argument("--qlora", action="store_true", help="bitsandbytes NF4 base weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None,
                   help="default: benchmarks/e2e.py's, <tmp>/sloth_bench_models/<model>-<dtype>")
    p.add_argument("--recreate", action="store_true")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (a temp folder under --smoke)")
    p.add_argument("--fresh", action="store_true", help="do not keep other impls' results from an earlier file")
    p.add_argument("--device", default="auto")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per worker process before it is killed (default: its search budget + 420)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, fp32, CPU, lengths 64..256 in steps of 32, a simulated OOM above 160 tokens")
    p.add_argument("--fake-oom-above", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.dtype = "tiny", "cpu", "fp32"
        args.max_seq, args.start_seq, args.resolution = min(args.max_seq, 256), 64, 32
        args.impls = ",".join(i for i in args.impls.split(",") if i != "unsloth")
        args.fake_oom_above = 160 if args.fake_oom_above is None else args.fake_oom_above
        args.impl_budget_s = min(args.impl_budget_s, 120.0)
    else:
        args.dtype = "bf16"
    args.fake_oom_above = args.fake_oom_above or 0
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.gettempdir())
    args.model_dir = args.model_dir or str(tmp / "sloth_bench_models" / f"{args.model}-{args.dtype}")
    args.out_dir = args.out_dir or str((tmp / "sloth_bench_smoke") if args.smoke else C.RESULTS_DIR)
    args.name = f"longest_seq_{args.model}" + ("_qlora" if args.qlora else "")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:
        worker(parse_worker_args(argv[1:]))
        return 0
    args = parse_args(argv)
    E = _load("e2e")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"unknown impl(s) {unknown}; choose from {list(IMPLS)}")
    if args.device == "cpu" and not args.smoke:
        print("note: no CUDA, so no memory cap: lengths stop at --max-seq or the time budget", flush=True)
    start = time.perf_counter()
    work = Path(tempfile.gettempdir()) / "sloth_bench_work"
    print(f"{args.name}: batch 1, LoRA r16, {args.dtype}{' QLoRA NF4' if args.qlora else ''}, budget "
          f"{args.budget_gib:g} GiB, lengths {args.start_seq}..{args.max_seq} step {args.resolution}, "
          f"{args.impl_budget_s:.0f} s per impl, impls {impls}, device {args.device}", flush=True)
    model_meta = E.ensure_model(SimpleNamespace(
        model_dir=args.model_dir, recreate=args.recreate, model=args.model, dtype=args.dtype, device=args.device,
        seed=args.seed, out_dir=args.out_dir, name=args.name, timeout=900.0, verbose=args.verbose, smoke=args.smoke),
        work)
    view = long_context_view(Path(args.model_dir), args.max_seq)
    config = dict(vars(args))
    path = Path(args.out_dir) / f"{args.name}.json"
    results: List[dict] = []
    for impl in impls:
        left = args.impl_budget_s
        if args.time_budget_s:
            left = min(left, args.time_budget_s - (time.perf_counter() - start))
        missing = E.missing_modules(IMPLS[impl]["base"], args.qlora, args.device)
        if missing or left <= 0:
            why = f"needs {', '.join(missing)}" if missing else "time budget spent"
            print(f"  [{impl}] skipped: {why}", flush=True)
            results.append({"impl": impl, "ok": False, "skipped": why})
            continue
        print(f"  [{impl}] starting ({time.perf_counter() - start:.0f} s elapsed, {left:.0f} s to search)", flush=True)
        r = run_impl(impl, args, view, left, args.timeout or left + 420, work)
        results.append(r)
        C.write_json(path, {"config": config, "model": model_meta, "results": merged_results(path, args, results),
                            "elapsed_s": time.perf_counter() - start})
    results = merged_results(path, args, results)
    C.write_json(path, {"config": config, "model": model_meta, "results": results,
                        "elapsed_s": time.perf_counter() - start})
    print()
    print(summary_table(results))
    done = [r for r in results if r.get("longest_ok")]
    png = None
    if done:
        png = C.plot_panels(path.with_suffix(".png"), [
            {"title": "longest sequence that trained (batch 1)", "ylabel": "tokens (thousands)",
             "groups": {r["impl"]: {"longest": r["longest_ok"] / 1024} for r in done}, "hline": args.max_seq / 1024},
            {"title": "peak memory at that length", "ylabel": "GiB (max_memory_allocated)",
             "groups": {r["impl"]: {"GiB": r.get("peak_gib_at_longest")} for r in done}, "hline": args.budget_gib},
        ], title=f"{args.name}: budget {args.budget_gib:g} GiB, LoRA r16, resolution {args.resolution}")
    print(f"wrote {path}" + (f" and {png}" if png else "") + f" in {time.perf_counter() - start:.0f} s")
    failed = [r for r in results if not r.get("ok") and not r.get("skipped") and not r.get("from_earlier_run")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
