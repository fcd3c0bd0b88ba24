"""The benchmark runner: scenarios x implementations, each implementation in its own process, on
one random-init model per shape saved once (slothbench.models), one meter, one result schema.

    python benchmarks/run.py --list                                   # the named scenarios
    python benchmarks/run.py --scenario e2e-8b-qlora                  # hf_peft, sloth, liger, unsloth
    python benchmarks/run.py --scenario e2e-8b-offload,e2e-8b-qlora-offload
    python benchmarks/run.py --families all --modes bf16,qlora        # the cross-family matrix
    python benchmarks/run.py --families qwen3-8b,gemma-2-9b --modes bf16 --data longtail
    python benchmarks/run.py --scenario e2e-8b --impls sloth,unsloth --sloth-config '{"gradient_checkpointing": "offload"}'
    python benchmarks/run.py --scenario e2e-8b-host --host-profile    # where a step's host time goes
    python benchmarks/run.py --scenario e2e-1b --smoke                # tiny model, fp32, CPU
    python benchmarks/run.py --scenario dpo-8b,grpo-1b                # TRL's trainers (slothbench.rl)
    python benchmarks/run.py --scenario vl-gemma3-4b,vl-qwen2.5-vl-7b  # image+text batches (vision-language)

Every implementation runs the same step loop on the same batches: forward under autocast(bf16)
(fp32 under --smoke; an fp16 row: fp16 with a GradScaler), backward, AdamW (lr 1e-4), zero_grad,
synchronized around every step.
Rows (one per scenario x implementation, in <out-dir>/<name>.json, rewritten after each):
scenario, impl, ok, tok_s (processed tokens/s over the timed steps), real_tok_s (non-pad tokens),
peak_gib (max_memory_allocated from after loading, weights included, kept across other code's
resets), mfu ((4 N_matmul tokens + 6 L d sum(len^2)) / time / --peak-tflops), loss_step0,
loss_final, error (the last line of a failed worker's output) and the details (losses, step
times, patch report, profile ...). A failed implementation is recorded, never dropped; one whose
modules are missing is recorded as skipped. Cells already in the JSON are skipped unless --force
(--retry-failed reruns failed ones). A PNG beside the JSON plots tokens/s against peak GiB per
scenario, the Pareto front marked.

--define NAME=JSON adds an implementation: {"base": "hf"|"unsloth", "sloth": {SlothConfig keys},
"liger": true, "layout": "packed", "grad_ckpt": false}; see slothbench.models.IMPLS.
"""
from __future__ import annotations

import argparse
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
from typing import List, Optional

import _common as C  # noqa: I001  (first: keeps benchmarks/ off sys.path, registers slothbench)
from slothbench import data as D
from slothbench import models as M
from slothbench import plot as P
from slothbench import scenarios as S

MARK = "@@SLOTHBENCH@@ "
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PROFILE_EXTRA_S = 180     # worker timeout added by --profile / --host-profile


def emit(event: str, **data) -> None:
    print(MARK + json.dumps({"event": event, **data}, default=str), flush=True)


def _device(name: str):
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


# ------------------------------------------------------------------------------------------ worker

def _to(value, device, dtype):
    """A batch entry on the device; floating ones (images' pixel values) in the run's dtype."""
    if not hasattr(value, "to"):
        return value
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def worker(job: dict) -> None:
    spec, scn = job["spec"], job["scenario"]
    if spec["base"] == "unsloth":
        import unsloth  # noqa: F401  (must precede transformers/peft)
    import torch
    from slothbench.meter import GcTime, PeakMemory
    from slothbench.profile import host_profile_steps, profile_steps
    device, dtype = _device(job["device"]), getattr(torch, DTYPES[job["dtype"]])
    if scn["run"] in ("dpo", "grpo", "sft"):   # TRL's / HF's trainer runs the steps (slothbench.rl)
        from slothbench import rl
        rl.run(job, spec, scn, device, dtype, M.load, emit, M.sloth_options)
        return
    cuda, d = device.type == "cuda", scn["data"]
    seed, qlora = job["seed"], scn["mode"] == "qlora"
    full_cfg = json.loads((Path(job["model_dir"]) / "config.json").read_text())
    cfg = M.text_config(full_cfg)           # a vision-language model's language model
    cap = None
    if scn["run"] == "longest":
        from slothbench import longest
        cap = longest.cap_memory(device, scn["longest"]["budget_gib"])
    sloth_extra = dict(job["sloth_extra"] or {})
    if cap is not None or scn["run"] == "longest":       # auto plans for the search's budget
        if (spec.get("sloth") or {}).get("gradient_checkpointing") == "auto":
            sloth_extra.setdefault("memory_budget_gb", scn["longest"]["budget_gib"])
    settle_extra = 5 if scn["settle"] else 0
    plan = D.plan(d, scn["warmup"] + scn["steps"] + settle_extra, seed)
    t0 = time.perf_counter()
    model, info = M.load(spec, job["model_dir"], device, dtype, qlora=qlora, grad_ckpt=spec.get("grad_ckpt",
                         scn["grad_ckpt"]), seed=seed, sloth_extra=sloth_extra, unsloth_gc=job["unsloth_gc"],
                         max_seq=scn["longest"]["max_seq"] if scn["run"] == "longest" else max(map(max, plan)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    info.update(trainable_params=sum(p.numel() for p in trainable),
                lora_param_dtype=str(trainable[0].dtype) if trainable else None)
    optimizer = torch.optim.AdamW(trainable, lr=job["lr"])
    load_s = time.perf_counter() - t0
    memory = PeakMemory(device)
    if cuda:
        torch.cuda.synchronize(device)
        info["model_mem_gib"] = torch.cuda.memory_allocated(device) / C.GiB
    memory.start()
    emit("loaded", load_s=round(load_s, 1), cap=cap, **info)
    if scn["run"] == "longest":
        from slothbench import longest
        p = dict(scn["longest"], search_budget_s=job["search_budget_s"])
        out = longest.search(model, optimizer, spec, p, cfg["vocab_size"], device, dtype, memory, cap, emit, seed,
                             job.get("fake_oom_above", 0))
        emit("result", ok=True, load_s=load_s, **out, **info)
        return

    layout, longtail = spec.get("layout", "padded"), d["kind"] == "longtail"
    steps = []
    for i, (lengths, tokens) in enumerate(zip(plan, D.token_steps(d, plan, D.token_limit(full_cfg), seed))):
        cpu = D.step_batches(d, tokens, layout, spec["base"] == "unsloth", cfg.get("pad_token_id") or 0,
                             cfg=full_cfg, seed=seed * 1_000_003 + i)
        real, processed, targets = D.count_tokens(cpu)
        steps.append(dict(batches=[{k: _to(v, device, dtype) for k, v in b.items()} for b in cpu],
                          real=real, processed=processed, targets=targets, sq=sum(n * n for n in lengths),
                          n_items=torch.tensor(targets, device=device) if longtail else None))
    use_autocast = bool(dtype in (torch.bfloat16, torch.float16) and job["autocast"])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)     # the fp16 rows' loss scaling
    skipped = [0]

    def step(s: dict):
        total = None
        for b in s["batches"]:
            with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
                kw = {"num_items_in_batch": s["n_items"]} if s["n_items"] is not None else {}
                loss = model(**b, **kw).loss
            scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:     # inf/nan gradients: the step was skipped
            skipped[0] += 1
        optimizer.zero_grad(set_to_none=True)
        return total

    controller = None
    if scn["settle"] and spec.get("sloth") is not None:
        from sloth_plugins import get_checkpoint_controller
        controller = get_checkpoint_controller(model)
    gc_time, rows, timed_from, decisions = GcTime(), [], None, None
    for i, s in enumerate(steps):
        settled = controller is None or (controller.settled and controller.decisions == decisions)
        if timed_from is None and i >= scn["warmup"] and (settled or i >= scn["warmup"] + settle_extra):
            timed_from = i
            memory.mark()
        if timed_from is not None and i - timed_from >= scn["steps"]:
            break
        decisions = controller.decisions if controller is not None else None
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        gc_time.start_step()
        loss = step(s)
        host = time.perf_counter() - t
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        gc_ms, gc_counts = gc_time.end_step()
        rows.append(dict(loss=float(loss.float().item()), step_s=dt, host_s=host, gc_ms=gc_ms, gc=gc_counts))
        emit("step", step=i, warmup=timed_from is None, loss=rows[-1]["loss"], step_s=dt, tok_s=s["processed"] / dt,
             real_tok_s=s["real"] / dt)
    timed_from = len(rows) if timed_from is None else timed_from
    timed, used = rows[timed_from:], steps[:len(rows)]
    seconds = sum(r["step_s"] for r in timed)
    real = sum(s["real"] for s in used[timed_from:])
    processed = sum(s["processed"] for s in used[timed_from:])
    flops = M.matmul_flops(cfg)
    work = 4 * flops["n_matmul"] * real + 6 * cfg["num_hidden_layers"] * cfg["hidden_size"] * \
        sum(s["sq"] for s in used[timed_from:])
    gib = lambda b: b / C.GiB if b is not None else None
    result = dict(
        ok=True, layout=layout, load_s=load_s, warmup_steps=timed_from, fingerprint=D.fingerprint(plan[:len(rows)]),
        tok_s=processed / seconds if seconds else None, real_tok_s=real / seconds if seconds else None,
        padding_frac=1 - real / processed if processed else None,
        step_s_mean=seconds / len(timed) if timed else None, step_s=[r["step_s"] for r in rows],
        losses=[r["loss"] for r in rows], loss_step0=rows[0]["loss"], loss_final=rows[-1]["loss"],
        host_s=[r["host_s"] for r in rows], gc_ms_per_timed_step=sum(r["gc_ms"] for r in timed) / max(1, len(timed)),
        gc_collections_timed=[sum(r["gc"][k] for r in timed) for k in range(3)],
        tokens_per_step=[s["processed"] for s in used], real_tokens_per_step=[s["real"] for s in used],
        label_tokens_per_step=[s["targets"] for s in used], batches_per_step=[len(s["batches"]) for s in used],
        peak_gib=gib(memory.peak()), peak_timed_gib=gib(memory.window_peak()) if timed else None,
        peak_reserved_gib=gib(memory.peak(reserved=True)), peak_resets_by_others=memory.resets_by_others,
        mfu=work / seconds / job["peak_flops"] if seconds else None, n_matmul=flops["n_matmul"],
        autocast=use_autocast, dtype=job["dtype"], **info)
    if scaler.is_enabled():
        result.update(scaler_skipped_steps=skipped[0], scaler_final_scale=scaler.get_scale())
    if controller is not None and getattr(controller, "plan", None) is not None:
        result["plan"] = controller.plan.summary()
    emit("result", **result)
    for flag, name, fn in (("profile", "profile", lambda: profile_steps(step, steps[-2:], device,
                                                                        result["step_s_mean"] or rows[-1]["step_s"])),
                           ("host_profile", "host_profile", lambda: host_profile_steps(step, steps[-3:], device))):
        if job.get(flag):
            try:
                out = fn()
            except Exception as exc:  # the timed result is already out; a failed profile must not void it
                out = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            emit(name, **out)


def create_main(argv: List[str]) -> None:
    import torch
    p = argparse.ArgumentParser(prog="run.py create")
    p.add_argument("--model", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    meta = M.create(a.model, Path(a.dir), _device(a.device), getattr(torch, DTYPES[a.dtype]), a.seed)
    emit("created", **meta, dir=a.dir)


# ------------------------------------------------------------------------------------------ driver

def worker_env(smoke: bool) -> dict:
    env = dict(os.environ)
    if smoke:
        env["OMP_NUM_THREADS"] = "1"      # tiny CPU ops: extra threads only spin (100x slower on a busy host)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1",
               DO_NOT_TRACK="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return env


def stream(cmd: List[str], log_path: Path, timeout_s: float, on_event, verbose: bool, cwd: Path, env: dict) -> dict:
    """Run one worker in its own session; forward its events; return {'rc', 'timed_out', 'tail'}."""
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


def _why(res: dict) -> str:
    return "timed out" if res["timed_out"] else f"exit code {res['rc']}"


def _last_error(tail: List[str]) -> Optional[str]:
    lines = [line.strip() for line in tail if line.strip()]
    return lines[-1][:400] if lines else None


def ensure_model(args, model: str, work: Path) -> tuple:
    target = Path(args.model_cache) / f"{model}-{args.dtype}"
    meta_path = target / "bench_meta.json"
    if meta_path.exists() and not args.recreate:
        meta = json.loads(meta_path.read_text())
        if meta.get("model") == model:
            print(f"model: reusing {target} ({meta.get('params', 0) / 1e9:.2f} B params)", flush=True)
            return target, meta
    print(f"model: creating random-init {model} in {target} on {args.device} ...", flush=True)
    created = {}
    cmd = [sys.executable, str(Path(__file__).resolve()), "create", "--model", model, "--dir", str(target.resolve()),
           "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)]
    res = stream(cmd, Path(args.out_dir) / "logs" / f"create_{model}.log", 1800, created.update, args.verbose,
                 work / "create", worker_env(args.smoke))
    if res["rc"] != 0 or not created:
        raise RuntimeError(f"model creation failed ({_why(res)}): {_last_error(res['tail'])}")
    print(f"model: created {created.get('params', 0) / 1e9:.2f} B params in {created.get('created_s')} s", flush=True)
    return target, created


def run_dtype(args, scn: dict) -> str:
    """The dtype an implementation loads and autocasts in: fp16 for an fp16 row (the model folder's bf16
    weights cast on load; fp32 LoRA weights and a GradScaler, as HF Trainer(fp16=True) trains on GPUs
    without bf16), else the run's (bf16; fp32 under --smoke)."""
    return "fp16" if scn["mode"] == "fp16" else args.dtype


def run_impl(args, scn: dict, impl: str, spec: dict, model_dir: Path, work: Path, budget_s: float) -> dict:
    job = dict(scenario=scn, impl=impl, spec=spec, model_dir=str(model_dir.resolve()), device=args.device,
               dtype=run_dtype(args, scn), seed=args.seed, lr=args.lr, autocast=args.autocast, peak_flops=args.peak_tflops * 1e12,
               unsloth_gc=args.unsloth_gc, sloth_extra=args.sloth_config, profile=args.profile,
               host_profile=args.host_profile, search_budget_s=budget_s, fake_oom_above=args.fake_oom_above)
    state: dict = {}
    t0 = time.perf_counter()

    def on_event(e: dict) -> None:
        kind = e.pop("event")
        if kind == "loaded":
            state["loaded"] = e
            print(f"  [{impl}] loaded in {e['load_s']:.0f} s, {e.get('trainable_params', 0) / 1e6:.1f} M trainable"
                  + (f", weights {e['model_mem_gib']:.1f} GiB" if e.get("model_mem_gib") else ""), flush=True)
            for k, v in (e.get("patch_report") or {}).items():
                if v.get("fallback"):
                    print(f"  [{impl}] {k} fell back {v['fallback']}x: {'; '.join(v['why'])[:200]}", flush=True)
        elif kind == "step":
            print(f"  [{impl}] step {e['step'] + 1}{' (warmup)' if e['warmup'] else ''}  loss {e['loss']:.4f}  "
                  f"{e['step_s'] * 1e3:.0f} ms  {e['real_tok_s']:,.0f} real tok/s", flush=True)
        elif kind == "try":
            print(f"  [{impl}] seq {e['seq']:>7,}  {e['status']:<4}  step {C.fmt(e['step_s'], 2)} s  peak "
                  f"{C.fmt(e['peak_gib'], 2)} GiB" + (f"  [{e['error'][:100]}]" if e.get("error") else ""), flush=True)
        else:
            state[kind] = e
    env = worker_env(args.smoke)
    if scn["run"] == "longest" and scn["longest"].get("alloc_conf"):
        env["PYTORCH_CUDA_ALLOC_CONF"] = scn["longest"]["alloc_conf"]
    timeout = args.timeout + (PROFILE_EXTRA_S if args.profile or args.host_profile else 0) + \
        (budget_s if scn["run"] == "longest" else 0)
    res = stream([sys.executable, str(Path(__file__).resolve()), "worker", "--job", json.dumps(job)],
                 Path(args.out_dir) / "logs" / f"{scn['name']}_{impl}.log", timeout, on_event, args.verbose,
                 work / impl, env)
    row = {"scenario": scn["name"], "impl": impl, "spec": spec, "wall_s": time.perf_counter() - t0}
    if "result" in state:
        row.update(state["result"])
        row.update({k: state[k] for k in ("profile", "host_profile") if k in state})
        if res["rc"] != 0:       # a crash at interpreter exit does not void the measurement
            row["exit_code"] = res["rc"]
        return row
    print(f"  [{impl}] FAILED ({_why(res)}); last lines:\n" + "\n".join("    | " + l for l in res["tail"][-25:]),
          flush=True)
    return {**row, "ok": False, "error": _last_error(res["tail"]) or _why(res), "why": _why(res),
            "tail": res["tail"][-25:], **({"loaded": state["loaded"]} if "loaded" in state else {})}


def run_ddp(args, scn: dict, impl: str, work: Path) -> dict:
    """gpus > 1: HF Trainer + SlothCallback under torchrun DDP, through benchmarks/multi_gpu_train.py."""
    d, gpus = scn["data"], scn["gpus"]
    out = work / f"{scn['name']}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
           str(C.HERE / "multi_gpu_train.py"), "run", "--framework", "hf", "--engine", "ddp", "--tag", scn["name"],
           "--shape", scn["model"], "--dtype", args.dtype, "--data", "random", "--seq", str(d["seq"]),
           "--global-batch", str(d["batch"] * gpus), "--steps", str(scn["warmup"] + scn["steps"]),
           "--warmup", str(scn["warmup"]), "--lr", str(args.lr), "--out", str(out),
           "--grad-ckpt", (args.sloth_config or {}).get("gradient_checkpointing", "auto")]
    t0 = time.perf_counter()
    res = stream(cmd, Path(args.out_dir) / "logs" / f"{scn['name']}_{impl}.log", args.timeout, lambda e: None,
                 args.verbose, work / impl, worker_env(args.smoke))
    row = {"scenario": scn["name"], "impl": impl, "wall_s": time.perf_counter() - t0, "gpus": gpus}
    if res["rc"] != 0 or not out.exists():
        return {**row, "ok": False, "error": _last_error(res["tail"]) or _why(res), "tail": res["tail"][-25:]}
    r = json.loads(out.read_text().splitlines()[-1])
    flops = M.matmul_flops(M.build_config(scn["model"]).to_dict(), d["seq"])["flops_per_token"]
    peaks = [p for p in r["peak_gib_per_gpu"] if p is not None]
    return {**row, "ok": True, "tok_s": r["tokens_per_s"], "real_tok_s": r["tokens_per_s"],
            "peak_gib": max(peaks) if peaks else None, "peak_gib_per_gpu": r["peak_gib_per_gpu"],
            "mfu": r["tokens_per_s"] * flops / (args.peak_tflops * 1e12 * gpus) if r["tokens_per_s"] else None,
            "loss_step0": r["losses"][0], "loss_final": r["losses"][-1], "losses": r["losses"],
            "step_s_mean": r["s_per_step"], "wrapped": r["wrapped"], "sloth": r["sloth"]}


def summary_table(rows: List[dict]) -> str:
    ok = {r["impl"]: r for r in rows if r.get("ok")}
    if rows and "longest_ok" in next(iter(ok.values()), {}):
        return C.text_table(["impl", "longest ok", "shortest fail", "peak GiB", "tok/s", "tries", "note"], [
            [r["impl"], C.fmt(r.get("longest_ok")), C.fmt(r.get("shortest_fail")), C.fmt(r.get("peak_gib"), 2),
             C.fmt(r.get("tok_s"), 0), str(len(r.get("tries", []))),
             r.get("error") or r.get("skipped") or r.get("stopped") or ""] for r in rows])
    base = lambda name, r: (f"{r['real_tok_s'] / ok[name]['real_tok_s']:.2f}x"
                            if name in ok and r.get("real_tok_s") and ok[name].get("real_tok_s") else "-")
    table, why = [], []
    for r in rows:
        if not r.get("ok"):
            table.append([r["impl"], "skipped" if r.get("skipped") else "FAILED"] + ["-"] * 9)
            why.append(f"  {r['impl']}: {r.get('skipped') or r.get('error')}")
            continue
        table.append([r["impl"], C.fmt(r.get("tok_s"), 0), C.fmt(r.get("real_tok_s"), 0), base("hf_peft", r),
                      base("unsloth", r), C.fmt(r["step_s_mean"] * 1e3 if r.get("step_s_mean") else None, 1),
                      C.fmt(r.get("peak_gib"), 2), C.fmt(100 * r["mfu"] if r.get("mfu") else None, 1),
                      C.fmt(r.get("loss_step0"), 5), C.fmt(r.get("loss_final"), 5), C.fmt(r.get("wall_s"), 0)])
    lines = [C.text_table(["impl", "tok/s", "real tok/s", "vs hf_peft", "vs unsloth", "step ms", "peak GiB", "MFU %",
                           "loss step0", "loss final", "wall s"], table)] + why
    if len(ok) >= 2:
        ref = ok.get("hf_peft") or next(iter(ok.values()))
        lines.append(f"step-0 loss minus {ref['impl']}'s ({ref['loss_step0']:.5f}): " + ", ".join(
            f"{r['impl']} {r['loss_step0'] - ref['loss_step0']:+.2e}" for r in ok.values() if r is not ref))
        prints = {r.get("fingerprint") for r in ok.values()}
        lines.append("same samples for every impl: " + ("yes" if len(prints) == 1 else f"NO ({prints})"))
    return "\n".join(lines)


def smoke(scn: dict) -> dict:
    """The scenario on the tiny model (vision-language: the tiny one of its family), fp32 (an fp16 row: fp16
    with its GradScaler), CPU, 1 warmup + 2 timed steps."""
    d = scn["data"]
    if d["kind"] == "grpo":
        data = S.grpo(prompt=8, completion=8, generations=2)
    elif d["kind"] == "image":                  # the tiny VL models: 4 soft tokens an image
        data = S.image(min(d["batch"], 2), 8, image_tokens=4)
    else:
        data = S.fixed(min(d.get("batch", 2), 2), 32) if d["kind"] == "fixed" else S.longtail(4, 2, 20.0, 4, 64)
    out = dict(scn, model=M.smoke_shape(scn["model"]), mode="fp16" if scn["mode"] == "fp16" else "bf16", data=data, warmup=min(scn["warmup"], 1),
               steps=min(scn["steps"], 2))
    if scn["run"] == "longest":
        out["longest"] = dict(scn["longest"], max_seq=256, start_seq=64, resolution=32, impl_budget_s=120.0)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="", help="comma-separated named scenarios (--list)")
    p.add_argument("--families", default="", help="matrix: comma-separated model shapes, or all")
    p.add_argument("--modes", default="bf16", help="matrix: bf16,qlora,fp16")
    p.add_argument("--data", default="fixed", choices=["fixed", "longtail"], help="matrix: batch lengths")
    p.add_argument("--grad-ckpt", default="on", choices=["on", "off"], help="matrix: gradient checkpointing")
    p.add_argument("--impls", default="", help="comma-separated, replaces every scenario's list")
    p.add_argument("--define", action="append", default=[], metavar="NAME=JSON", help="an extra implementation")
    p.add_argument("--sloth-config", default=None, type=json.loads, help="SlothConfig keys for every sloth impl")
    p.add_argument("--batch-size", type=int, default=None, help="fixed / image data: overrides the scenarios'")
    p.add_argument("--seq-len", type=int, default=None,
                   help="fixed data: overrides the scenarios' (image data: the text tokens after the image)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps after the warmup")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--no-autocast", dest="autocast", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="MFU denominator (dense bf16 TFLOP/s)")
    p.add_argument("--unsloth-gc", default="unsloth", choices=["unsloth", "true"])
    p.add_argument("--profile", action="store_true", help="2 more steps under torch.profiler per impl")
    p.add_argument("--host-profile", action="store_true", help="3 more steps under cProfile per impl")
    p.add_argument("--force", action="store_true", help="rerun cells already in the JSON")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells that failed")
    p.add_argument("--name", default=None, help="result file stem (default: the scenario, or 'matrix')")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (a temp folder under --smoke)")
    p.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "sloth_bench_models"))
    p.add_argument("--recreate", action="store_true", help="re-create the model folders")
    p.add_argument("--device", default="auto")
    p.add_argument("--timeout", type=float, default=360.0, help="seconds per worker before it is killed")
    p.add_argument("--time-budget-s", type=float, default=0.0, help="start no impl after this long (0: no limit)")
    p.add_argument("--verbose", action="store_true", help="echo every line the workers print")
    p.add_argument("--smoke", action="store_true", help="tiny model, fp32, CPU, 1 + 2 steps")
    p.add_argument("--fake-oom-above", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--list", action="store_true", help="print the named scenarios and model shapes")
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    args.dtype = "fp32" if args.smoke else "bf16"
    args.fake_oom_above = (160 if args.smoke else 0) if args.fake_oom_above is None else args.fake_oom_above
    args.out_dir = args.out_dir or str((Path(tempfile.gettempdir()) / "sloth_bench_smoke") if args.smoke
                                       else C.RESULTS_DIR)
    return args


def scenarios_of(args) -> List[dict]:
    out = []
    for name in filter(None, (s.strip() for s in args.scenario.split(","))):
        if name not in S.NAMED:
            raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(S.NAMED)}")
        out.append(json.loads(json.dumps(S.NAMED[name])))
    if args.families:
        out += S.matrix(args.families.split(","), args.modes.split(","), args.data, args.grad_ckpt == "on")
    defined = dict(M.IMPLS)
    for item in args.define:
        name, _, spec = item.partition("=")
        defined[name] = {"base": "hf", **json.loads(spec)}
    for scn in out:
        if args.impls:
            scn["impls"] = [i.strip() for i in args.impls.split(",") if i.strip()]
        if scn["data"]["kind"] in ("fixed", "image"):
            seq = "seq" if scn["data"]["kind"] == "fixed" else "text"
            scn["data"].update({k: v for k, v in (("batch", args.batch_size), (seq, args.seq_len)) if v})
        scn.update({k: getattr(args, k) for k in ("warmup", "steps") if getattr(args, k) is not None})
        scn["define"] = {**defined, **scn["define"]}
        unknown = [i for i in scn["impls"] if i not in scn["define"]]
        if unknown:
            raise SystemExit(f"{scn['name']}: unknown impl(s) {unknown}; choose from {sorted(scn['define'])}")
    return [smoke(s) for s in out] if args.smoke else out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:
        worker(json.loads(argv[2]))
        return 0
    if argv[:1] == ["create"]:
        create_main(argv[1:])
        return 0
    args = parse_args(argv)
    if args.list:
        print(C.text_table(["scenario", "model", "mode", "data", "gc", "gpus", "run", "impls"], [
            [s["name"], s["model"], s["mode"], json.dumps(s["data"]), str(s["grad_ckpt"]), str(s["gpus"]), s["run"],
             ",".join(s["impls"])] for s in S.NAMED.values()], left=8))
        print("\nmodel shapes: " + ", ".join(M.SHAPES) + "; families (--families all): " + ", ".join(M.FAMILIES))
        return 0
    scns = scenarios_of(args)
    if not scns:
        raise SystemExit("nothing to run: --scenario NAME[,NAME] and/or --families all|F1,F2 (--list)")
    name = args.name or (scns[0]["name"] if len(scns) == 1 else "matrix")
    path = Path(args.out_dir) / f"{name}.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    payload.update(config={k: v for k, v in vars(args).items()}, scenarios=payload.get("scenarios", {}))
    rows: List[dict] = payload.get("rows", [])
    work = Path(tempfile.gettempdir()) / "sloth_bench_work"
    start, failed = time.perf_counter(), False
    for scn in scns:
        d = scn["data"]
        print(f"\n== {scn['name']}: {scn['model']} {scn['mode']}, {json.dumps(d)}, checkpointing "
              f"{'on' if scn['grad_ckpt'] else 'off'}, {scn['gpus']} GPU(s), {scn['run']}, {scn['warmup']} warmup + "
              f"{scn['steps']} steps, impls {scn['impls']}, device {args.device}", flush=True)
        info = payload["scenarios"].setdefault(scn["name"], {})
        info.update(scenario={k: v for k, v in scn.items() if k != "define"})
        if d["kind"] == "longtail":
            info["dataset"] = D.summary(d, D.plan(d, scn["warmup"] + scn["steps"], args.seed))
        model = None
        for impl in scn["impls"]:
            spec = scn["define"][impl]
            old = next((r for r in rows if (r["scenario"], r["impl"]) == (scn["name"], impl)), None)
            if old is not None and not args.force and not old.get("skipped") and (old.get("ok") or not args.retry_failed):
                print(f"  [{impl}] in {path.name} already ({'ok' if old.get('ok') else 'failed'}): kept (--force reruns)")
                continue
            row = None
            needs = M.missing_modules(spec, scn["mode"] == "qlora" and not args.smoke, args.device)
            if scn["gpus"] > 1 and args.device == "cpu":
                needs.append(f"{scn['gpus']} CUDA GPUs")
            over = bool(args.time_budget_s) and time.perf_counter() - start > args.time_budget_s
            spec, no_budget = S.with_measured_budget(spec, rows, scn["name"])
            if needs or over or no_budget:
                why = f"needs {', '.join(needs)}" if needs else ("time budget spent" if over else no_budget)
                row = {"scenario": scn["name"], "impl": impl, "ok": False, "skipped": why}
                print(f"  [{impl}] skipped: {why}", flush=True)
            elif scn["gpus"] > 1:
                row = run_ddp(args, scn, impl, work)
            else:
                try:
                    if model is None:
                        model = ensure_model(args, scn["model"], work)
                        info["model"] = model[1]
                    model_dir = model[0]
                    if scn["run"] == "longest":
                        model_dir = M.long_context_view(model_dir, scn["longest"]["max_seq"])
                    budget = scn.get("longest", {}).get("impl_budget_s", 0.0)
                    if args.time_budget_s and budget:
                        budget = min(budget, args.time_budget_s - (time.perf_counter() - start))
                    print(f"  [{impl}] starting ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
                    row = run_impl(args, scn, impl, spec, model_dir, work, budget)
                except RuntimeError as exc:                  # the model could not be made: every impl fails
                    row = {"scenario": scn["name"], "impl": impl, "ok": False, "error": str(exc)}
            failed |= not row.get("ok") and not row.get("skipped")
            rows = [r for r in rows if (r["scenario"], r["impl"]) != (scn["name"], impl)] + [row]
            payload["rows"] = rows
            C.write_json(path, payload)
        print()
        print(summary_table([r for r in rows if r["scenario"] == scn["name"]]))
        for r in rows:
            if r["scenario"] == scn["name"] and r.get("ok"):
                from slothbench.profile import host_profile_table, profile_table
                for key, table in (("profile", profile_table), ("host_profile", host_profile_table)):
                    if r.get(key):
                        print("\n" + table(r))
    payload["rows"] = rows
    path = C.write_json(path, payload)
    png = P.plot(rows, path.with_suffix(".png"), f"{name}: tokens/s against peak memory, LoRA r16")
    print("\nMFU = (4 N_matmul tokens + 6 L d sum(len^2)) / time / "
          f"{args.peak_tflops:g}e12; N_matmul = parameters of all linear layers incl. lm_head")
    print(f"wrote {path}" + (f" and {png}" if png else "") + f" in {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
