"""Where a step's time goes: torch.profiler device time per kernel category, cProfile host time.

``--profile``: after the timed steps (so the timings and peaks are unaffected), two more steps run
under torch.profiler; the device time of every CUDA kernel and copy (CPU self time of every op on
CPU) is summed per category (PROFILE_CATEGORIES) and per kernel. ``--host-profile``: three more
steps under cProfile. multi_gpu_train.py uses the same summaries.
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import _common as C  # loaded by whoever imports slothbench

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
