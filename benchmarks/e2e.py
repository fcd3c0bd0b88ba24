"""End-to-end LoRA / QLoRA training benchmark: the same step loop for each implementation,
each in its own process, on one random-init model saved once to a local folder.

    python benchmarks/e2e.py --model llama-1b                         # 4 impls, bf16, checkpointing on
    python benchmarks/e2e.py --model llama-8b --qlora --impls hf_peft,sloth
    python benchmarks/e2e.py --model llama-8b --grad-ckpt off --steps 5
    python benchmarks/e2e.py --model llama-8b --impls sloth,unsloth --profile   # + where the step's time goes
    python benchmarks/e2e.py --model llama-8b-host --qlora --impls sloth,unsloth --host-profile
                                                      # host cost of a step: 8B's 32 layers, 1/16 widths
    python benchmarks/e2e.py --smoke                                  # tiny model on CPU (hf_peft, sloth)

Implementations (each only when importable):
  hf_peft  transformers + PEFT
  sloth    transformers + PEFT + sloth_plugins.patch(model, SlothConfig())
  liger    liger_kernel.transformers.apply_liger_kernel_to_llama() + transformers + PEFT
  unsloth  unsloth.FastLanguageModel.from_pretrained(local folder) + get_peft_model
LoRA r16 alpha16 dropout 0 on q,k,v,o,gate,up,down; AdamW lr 1e-4; bf16 (autocast);
QLoRA = bitsandbytes NF4, double quant, bf16 compute (no prepare_model_for_kbit_training:
norms and lm_head stay bf16, as Unsloth keeps them). Same token batches for every impl.

Reports tokens/s over the timed steps, peak memory (max_memory_allocated, weights included),
MFU = tok/s * (4*N_matmul + 6*L*seq*d) / peak FLOPs (790e12 default), where N_matmul is the
number of parameters of all linear layers including lm_head (LoRA adapters excluded), and
every implementation's step-0 and final loss. Writes <out>/e2e_<name>.json (after every
implementation, so a killed run keeps what finished), e2e_<name>.png and one log per impl.

--profile: after its timed steps each worker profiles 2 more steps (torch.profiler) and sums
device time per kernel category (matmul, attention, norm/rope/activation/loss kernels, NF4
dequant, offload copies HtoD/DtoH, optimizer, ...; the table is PROFILE_CATEGORIES in
e2e_worker.py); stored as "profile" in each implementation's result, printed per impl.
--host-profile: then 3 more steps under cProfile: the Python functions a step spends its host
time in ("host_profile"). With --model llama-8b-host (llama-8b's 32 layers and modules at 1/16
of its widths, so the GPU always waits for the host) the step time itself is the host cost.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (first: keeps benchmarks/ off sys.path)

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, List, Optional

WORKER = C.HERE / "e2e_worker.py"
MARK = "@@SLOTHBENCH@@ "
IMPLS = ["hf_peft", "sloth", "liger", "unsloth"]
DEFAULT_BATCH = {"llama-1b": 8, "llama-8b": 2, "llama-8b-host": 2, "tiny": 2}
PROFILE_EXTRA_S = 180     # worker timeout added by --profile: 2 more steps and the trace's analysis
NEEDS = {"hf_peft": ["transformers", "peft"], "sloth": ["transformers", "peft", "sloth_plugins"],
         "liger": ["transformers", "peft", "liger_kernel"], "unsloth": ["unsloth", "peft"]}


def missing_modules(impl: str, qlora: bool, device: str) -> List[str]:
    needed = NEEDS[impl] + (["bitsandbytes"] if qlora else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if impl in ("liger", "unsloth") and device == "cpu":
        missing.append("a CUDA GPU")
    return missing


def stream_worker(cmd: List[str], log_path: Path, timeout_s: float, on_event, verbose: bool, cwd: Path,
                  env: dict) -> dict:
    """Run one worker; forward its events; return {'rc', 'timed_out', 'tail'}."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)      # Unsloth writes unsloth_compiled_cache/ into its cwd
    tail: deque = deque(maxlen=40)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                cwd=cwd, env=env, start_new_session=True)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)     # the worker's own session: it and its helpers
            except ProcessLookupError:
                pass
        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                at = line.find(MARK)
                if at >= 0:
                    try:
                        on_event(json.loads(line[at + len(MARK):]))
                        continue
                    except json.JSONDecodeError:
                        pass
                tail.append(line.rstrip("\n"))
                if verbose:
                    print("    | " + line.rstrip("\n"), flush=True)
            rc = proc.wait()
        finally:
            timer.cancel()
    return {"rc": rc, "timed_out": timed_out.is_set(), "tail": list(tail)}


def worker_env(smoke: bool = False) -> dict:
    env = dict(os.environ)
    if smoke:
        env["OMP_NUM_THREADS"] = "1"      # tiny CPU ops: extra threads only spin (100x slower on a busy host)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1",
               DO_NOT_TRACK="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return env


def ensure_model(args, work: Path) -> dict:
    meta_path = Path(args.model_dir) / "bench_meta.json"
    if meta_path.exists() and not args.recreate:
        meta = json.loads(meta_path.read_text())
        if meta.get("model") == args.model and meta.get("dtype") == args.dtype:
            print(f"model: reusing {args.model_dir} ({meta.get('params', 0) / 1e9:.2f} B params)", flush=True)
            return meta
    print(f"model: creating random-init {args.model} in {args.model_dir} on {args.device} ...", flush=True)
    t0 = time.perf_counter()
    created = {}
    cmd = [sys.executable, str(WORKER), "create", "--model", args.model, "--dir", str(Path(args.model_dir).resolve()),
           "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)]
    res = stream_worker(cmd, Path(args.out_dir) / f"e2e_{args.name}_create.log", args.timeout,
                        lambda e: created.update(e), args.verbose, work / "create", worker_env(args.smoke))
    if res["rc"] != 0 or not created:
        print("\n".join(res["tail"]), file=sys.stderr)
        raise SystemExit(f"model creation failed (rc {res['rc']}{', timed out' if res['timed_out'] else ''})")
    print(f"model: created {created.get('params', 0) / 1e9:.2f} B params in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return created


def run_impl(impl: str, args, work: Path, progress: C.Progress) -> dict:
    cmd = [sys.executable, str(WORKER), "train", "--impl", impl, "--dir", str(Path(args.model_dir).resolve()),
           "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--grad-ckpt", str(int(args.grad_ckpt == "on")), "--qlora", str(int(args.qlora)),
           "--autocast", str(int(args.autocast)), "--lr", str(args.lr), "--seed", str(args.seed),
           "--peak-flops", str(args.peak_tflops * 1e12), "--unsloth-gc", args.unsloth_gc,
           "--profile", str(int(args.profile)), "--host-profile", str(int(args.host_profile))]
    state = {"result": None, "loaded": None, "profile": None, "host_profile": None}
    t0 = time.perf_counter()

    def on_event(e: dict) -> None:
        if e["event"] == "loaded":
            state["loaded"] = e
            progress.write(f"  [{impl}] loaded in {e['load_s']:.0f} s (process up {time.perf_counter() - t0:.0f} s), "
                           f"{e.get('trainable_params', 0) / 1e6:.1f} M trainable"
                           + (f", weights {e['model_mem_gib']:.1f} GiB" if e.get("model_mem_gib") else ""))
            if e.get("patch_report") is not None:
                rep = e["patch_report"]
                progress.write(f"  [{impl}] patched: " + ", ".join(f"{k} {v['patched']}" for k, v in rep.items())
                               + "".join(f"; {k} fell back {v['fallback']}x: {'; '.join(v['why'])[:200]}"
                                         for k, v in rep.items() if v["fallback"]))
        elif e["event"] == "step":
            progress.update()
            progress.write(f"  [{impl}] step {e['step'] + 1}/{args.warmup + args.steps}"
                           f"{' (warmup)' if e['warmup'] else ''}  loss {e['loss']:.4f}  "
                           f"{e['step_s'] * 1e3:.0f} ms  {e['tok_s']:,.0f} tok/s")
        elif e["event"] == "result":
            state["result"] = e
        elif e["event"] == "profile":
            state["profile"] = {k: v for k, v in e.items() if k not in ("event", "impl")}
            progress.write(f"  [{impl}] profiled: " + (state["profile"].get("error") or
                                                       f"{state['profile'].get('events', 0)} events"))
        elif e["event"] == "host_profile":
            state["host_profile"] = {k: v for k, v in e.items() if k not in ("event", "impl")}
    timeout = args.timeout + (PROFILE_EXTRA_S if args.profile or args.host_profile else 0)
    res = stream_worker(cmd, Path(args.out_dir) / f"e2e_{args.name}_{impl}.log", timeout, on_event,
                        args.verbose, work / impl, worker_env(args.smoke))
    out = worker_outcome(impl, res, state["result"], state["loaded"], time.perf_counter() - t0, progress)
    if state["result"] is not None and args.profile:
        out["profile"] = state["profile"] or {"error": f"no profile event (worker {_why(res)})"}
    if state["result"] is not None and args.host_profile:
        out["host_profile"] = state["host_profile"] or {"error": f"no host_profile event (worker {_why(res)})"}
    return out


def _why(res: dict) -> str:
    return "timed out" if res["timed_out"] else f"exit code {res['rc']}"


def worker_outcome(impl: str, res: dict, result: Optional[dict], loaded: Optional[dict], wall: float,
                   progress: C.Progress) -> dict:
    """What one worker process gave (``res``: stream_worker's): its result event with the wall
    time (a crash at interpreter exit does not void the measurement, the exit code is kept), or a
    failure record with the last lines of its output."""
    if result is not None:
        out = {k: v for k, v in result.items() if k != "event"}
        out["wall_s"] = wall
        if res["rc"] != 0:
            out["exit_code"] = res["rc"]
        return out
    why = _why(res)
    progress.write(f"  [{impl}] FAILED ({why}); last lines:\n" + "\n".join("    | " + l for l in res["tail"][-25:]))
    return {"impl": impl, "ok": False, "error": why, "tail": res["tail"][-25:], "wall_s": wall,
            **({"loaded": loaded} if loaded else {})}


def run_each(impls: List[str], args, start: float, payload: dict, json_path: Path, progress: C.Progress, *,
             missing: Callable[[str], List[str]], run: Callable[[str], dict], done: Callable[[dict], str]) -> None:
    """The driver loop of e2e.py and padding_free.py: each implementation in turn, skipped (and
    recorded as such) when a module is missing or ``args.time_budget_s`` is spent; the JSON is
    rewritten after each one so a run cut short keeps what finished."""
    for impl in impls:
        needs = missing(impl)
        over = bool(args.time_budget_s) and time.perf_counter() - start > args.time_budget_s
        if needs or over:
            why = f"needs {', '.join(needs)}" if needs else "time budget spent"
            shown = why if needs else f"time budget of {args.time_budget_s:.0f} s spent"
            progress.write(f"  [{impl}] skipped: {shown}")
            payload["results"].append({"impl": impl, "ok": False, "skipped": why})
            progress.update(args.warmup + args.steps)
            continue
        progress.write(f"  [{impl}] starting ({time.perf_counter() - start:.0f} s elapsed)")
        result = run(impl)
        payload["results"].append(result)
        if result.get("ok"):
            progress.write(f"  [{impl}] {done(result)}")
        C.write_json(json_path, payload)


def summary_table(results: List[dict]) -> str:
    base = next((r for r in results if r["impl"] == "hf_peft" and r.get("ok")), None)
    rows, why = [], []
    for r in results:
        if not r.get("ok"):
            rows.append([r["impl"], "skipped" if r.get("skipped") else "FAILED"] + ["-"] * 8)
            why.append(f"  {r['impl']}: {r.get('skipped') or r.get('error')}")
            continue
        rel = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
        rows.append([r["impl"], f"{r['tok_s']:,.0f}", rel, f"{r['step_s_mean'] * 1e3:.1f}", C.fmt(r["peak_mem_gib"], 2),
                     f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "-", f"{r['loss_step0']:.4f}",
                     f"{r['loss_final']:.4f}", f"{r['load_s']:.0f}", f"{r['wall_s']:.0f}"])
    return "\n".join([C.text_table(["impl", "tok/s", "vs hf_peft", "step ms", "peak GiB", "MFU %", "loss step0",
                                    "loss final", "load s", "wall s"], rows)] + why)


def profile_table(result: dict, top: int = 8) -> str:
    prof = result.get("profile") or {}
    if prof.get("error"):
        return f"profile {result['impl']}: {prof['error']}"
    busy, idle = prof.get("device_busy"), prof.get("device_idle")
    head = (f"profile {result['impl']}: {prof['source']}, {prof['steps']} steps; "
            f"timed step {C.fmt(prof['step_ms'], 1)} ms (profiled {C.fmt(prof.get('profiled_step_ms'), 1)} ms), "
            f"sum {C.fmt(prof['total']['ms_per_step'], 1)} ms"
            + (f", device busy {C.fmt(busy['ms_per_step'], 1)} ms" if busy else "")
            + (f", idle {C.fmt(idle['ms_per_step'], 1)} ms ({C.fmt(idle['pct_of_step'], 1)}%)" if idle else "")
            + (f"; {prof['note']}" if prof.get("note") else ""))
    cats = C.text_table(["category", "ms/step", "% of step"],
                        [[c["category"], C.fmt(c["ms_per_step"], 2), C.fmt(c["pct_of_step"], 1)]
                         for c in prof["categories"]])
    kernels = C.text_table(["top kernels", "category", "calls/step", "ms/step", "%"],
                           [[k["name"][:70], k["category"], C.fmt(k["calls_per_step"], 1), C.fmt(k["ms_per_step"], 2),
                             C.fmt(k["pct_of_step"], 1)] for k in prof["top_kernels"][:top]], left=2)
    return "\n".join([head, cats, kernels])


def host_profile_table(result: dict, top: int = 15) -> str:
    prof = result.get("host_profile") or {}
    if prof.get("error"):
        return f"host profile {result['impl']}: {prof['error']}"
    head = (f"host profile {result['impl']}: {prof['source']}, {prof['steps']} steps, "
            f"{C.fmt(prof['profiled_step_ms'], 1)} ms a step under the profiler, "
            f"{prof['python_calls_per_step']:,.0f} Python calls a step")
    return "\n".join([head, C.text_table(
        ["by own time", "calls/step", "own ms/step", "cum ms/step"],
        [[r["function"][:80], C.fmt(r["calls_per_step"], 0), C.fmt(r["own_ms_per_step"], 2),
          C.fmt(r["cum_ms_per_step"], 2)] for r in prof["by_own_time"][:top]], left=2)])


def plot(results: List[dict], path: Path, title: str):
    ok = [r for r in results if r.get("ok")]
    if not ok:
        return None
    panels = [{"title": "throughput", "ylabel": "tokens/s", "groups": {r["impl"]: {"tok/s": r["tok_s"]} for r in ok}}]
    if any(r.get("peak_mem_gib") for r in ok):
        panels.append({"title": "peak memory", "ylabel": "GiB (max_memory_allocated)",
                       "groups": {r["impl"]: {"GiB": r["peak_mem_gib"]} for r in ok}})
    return C.plot_panels(path, panels, title)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b", choices=["llama-1b", "llama-8b", "llama-8b-host", "tiny"])
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, run in this order")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 for llama-1b, 2 for llama-8b")
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (32 for tiny)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps after the warmup")
    p.add_argument("--grad-ckpt", default="on", choices=["on", "off"])
    p.add_argument("--qlora", action="store_true", help="bitsandbytes NF4 base weights (double quant, bf16 compute)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 (fp32 for --smoke)")
    p.add_argument("--no-autocast", dest="autocast", action="store_false",
                   help="do not run forward under torch.autocast (default: autocast in bf16/fp16)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=790.0, help="MFU denominator (dense bf16 TFLOP/s)")
    p.add_argument("--unsloth-gc", default="unsloth", choices=["unsloth", "true"],
                   help="Unsloth's use_gradient_checkpointing when --grad-ckpt on")
    p.add_argument("--model-dir", default=None, help="default <tmp>/sloth_bench_models/<model>-<dtype>")
    p.add_argument("--recreate", action="store_true", help="re-create the model folder even if it exists")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (a temp folder under --smoke)")
    p.add_argument("--name", default=None, help="result name; default <model>_<bf16|qlora>_<gc|nogc>")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--timeout", type=float, default=360.0, help="seconds per worker process before it is killed")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="start no further implementation once this much time has passed (0: no limit)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile 2 more steps per impl: device time per kernel category")
    p.add_argument("--host-profile", action="store_true",
                   help="then 3 more steps per impl under cProfile: host time per Python function")
    p.add_argument("--verbose", action="store_true", help="echo every line the workers print")
    p.add_argument("--smoke", action="store_true", help="tiny model, fp32, CPU, hf_peft + sloth, 1+2 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device = "tiny", "cpu"
        args.dtype = args.dtype or "fp32"
        args.impls = ",".join(i for i in args.impls.split(",") if i in ("hf_peft", "sloth"))
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or "bf16"
    args.batch_size = args.batch_size or DEFAULT_BATCH[args.model]
    args.seq_len = args.seq_len or (32 if args.model == "tiny" else 2048)
    tmp = Path(tempfile.gettempdir())
    args.model_dir = args.model_dir or str(tmp / "sloth_bench_models" / f"{args.model}-{args.dtype}")
    args.out_dir = args.out_dir or str((tmp / "sloth_bench_smoke") if args.smoke else C.RESULTS_DIR)
    args.name = args.name or f"{args.model}_{'qlora' if args.qlora else args.dtype}_{'gc' if args.grad_ckpt == 'on' else 'nogc'}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"unknown impl(s) {unknown}; choose from {IMPLS}")
    out_dir = Path(args.out_dir)
    work = Path(tempfile.gettempdir()) / "sloth_bench_work"
    start = time.perf_counter()
    print(f"e2e {args.name}: {args.model} bs {args.batch_size} x seq {args.seq_len}, {args.dtype}"
          f"{' QLoRA NF4' if args.qlora else ''}, gradient checkpointing {args.grad_ckpt}, "
          f"{args.warmup} warmup + {args.steps} timed steps, device {args.device}, impls {impls}", flush=True)
    meta_model = ensure_model(args, work)
    payload = {"config": {k: v for k, v in vars(args).items()}, "model": meta_model,
               "mfu_definition": "tok/s * (4*N_matmul + 6*L*seq*d) / peak_flops; N_matmul = parameters of all "
                                 "linear layers incl. lm_head (LoRA adapters excluded)", "results": []}
    progress = C.Progress(total=len(impls) * (args.warmup + args.steps), desc=args.name)
    run_each(impls, args, start, payload, out_dir / f"e2e_{args.name}.json", progress,
             missing=lambda impl: missing_modules(impl, args.qlora, args.device),
             run=lambda impl: run_impl(impl, args, work, progress),
             done=lambda r: (f"{r['tok_s']:,.0f} tok/s, peak {C.fmt(r['peak_mem_gib'], 2)} GiB, "
                             f"loss {r['loss_step0']:.4f} -> {r['loss_final']:.4f}, wall {r['wall_s']:.0f} s"))
    progress.close()
    payload["total_s"] = time.perf_counter() - start
    path = C.write_json(out_dir / f"e2e_{args.name}.json", payload)
    print()
    print(summary_table(payload["results"]))
    print("MFU = tok/s * (4*N_matmul + 6*L*seq*d) / "
          f"{args.peak_tflops:g}e12, N_matmul = params of all linear layers incl. lm_head"
          + (f" = {payload['results'][0].get('n_matmul', 0) / 1e9:.3f} B" if payload["results"]
             and payload["results"][0].get("n_matmul") else ""))
    print(parity_line(payload["results"]))
    for r in payload["results"]:
        if r.get("ok") and r.get("host_s"):
            host = r["host_s"][args.warmup:] or r["host_s"]
            print(f"{r['impl']}: host returns from a step after {1e3 * sum(host) / len(host):.1f} ms (the step: "
                  f"{r['step_s_mean'] * 1e3:.1f} ms); garbage collector {r['gc_ms_per_timed_step']:.1f} ms a step, "
                  f"collections by generation {r['gc_collections_timed']}")
    for r in payload["results"]:
        if r.get("profile"):
            print()
            print(profile_table(r))
        if r.get("host_profile"):
            print()
            print(host_profile_table(r))
    png = plot(payload["results"], out_dir / f"e2e_{args.name}.png",
               f"{args.name}: bs {args.batch_size} x {args.seq_len}, LoRA r16, {args.device}")
    print(f"wrote {path}" + (f" and {png}" if png else "") + f" in {payload['total_s']:.0f} s")
    failed = [r for r in payload["results"] if not r.get("ok") and not r.get("skipped")]
    return 1 if failed else 0


def parity_line(results: List[dict]) -> str:
    ok = [r for r in results if r.get("ok")]
    if len(ok) < 2:
        return "loss parity: fewer than two implementations finished"
    ref = next((r for r in ok if r["impl"] == "hf_peft"), ok[0])
    parts = [f"{r['impl']} {r['loss_step0'] - ref['loss_step0']:+.2e}" for r in ok if r is not ref]
    return f"step-0 loss minus {ref['impl']}'s ({ref['loss_step0']:.5f}): " + ", ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
