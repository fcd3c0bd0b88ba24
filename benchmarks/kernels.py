"""Kernel benchmark: sloth_plugins' kernels vs torch eager, torch.compile of the eager
reference, and Liger-Kernel, at Llama-3-8B shapes in bf16.

    python benchmarks/kernels.py                      # all kernels, all implementations
    python benchmarks/kernels.py --kernels rms_norm,fused_ce --impls sloth,eager
    python benchmarks/kernels.py --kernels moe_qwen3_30b_a3b,moe_mixtral_8x7b   # MoE experts blocks vs
                                  # transformers' experts_implementation eager / grouped_mm / batched_mm
    python benchmarks/kernels.py --smoke              # tiny shapes on CPU (checks the code paths)

Per kernel and implementation: median time of forward, backward (graph built once, then
autograd.grad with retain_graph), and forward+backward; peak extra memory of each
(max_memory_allocated after a reset, minus what was live before); the relative error of
outputs and input gradients against eager. "forward" runs with autograd recording, as in
training. Prints a table, writes <out>/kernels.json and kernels.png.

"sloth" calls the public functions of sloth_plugins.kernels (Triton on CUDA). "compile" is
torch.compile of the eager reference (default mode, dynamic=False); its first call is timed
as compile_s. It runs with torch._functorch.config.donated_buffer=False, which timing the
backward alone (retain_graph) requires. Liger's RMSNorm runs as its Llama patch does
(casting_mode="llama", in_place=True); its GeGLU is tanh-only, so erf GeGLU has no Liger row.
"""
from __future__ import annotations

import argparse
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import _common as C  # noqa: I001  (first: keeps benchmarks/ off sys.path)
import torch
import torch.nn.functional as F

from sloth_plugins import kernels as SK
from sloth_plugins.kernels.activations import geglu_reference, swiglu_reference
from sloth_plugins.kernels.cross_entropy import fused_linear_cross_entropy_reference
from sloth_plugins.kernels.rms_norm import rms_norm_reference
from sloth_plugins.kernels.rope import apply_rope_reference

KERNELS = ["rms_norm", "rms_norm_dw", "rope", "swiglu", "geglu", "geglu_tanh", "fused_ce"]
# MoE experts blocks at their models' shapes (own shapes, not LLAMA3_8B); run with --kernels, not by default.
MOE_KERNELS = ["moe_qwen3_30b_a3b", "moe_mixtral_8x7b", "moe_glm45_air", "moe_qwen3_30b_a3b_lora", "moe_mixtral_8x7b_lora",
               "moe_glm45_air_lora"]
IMPLS = ["sloth", "eager", "compile", "liger", "torch_chunked", "grouped_mm", "batched_mm"]
MODES = ["fwd", "bwd", "fwdbwd"]

LLAMA3_8B = dict(batch=4, seq=2048, hidden=4096, intermediate=14336, q_heads=32, kv_heads=8, head_dim=128,
                 vocab=128256, eps=1e-5)
SMOKE = dict(batch=2, seq=32, hidden=128, intermediate=256, q_heads=4, kv_heads=2, head_dim=32, vocab=512, eps=1e-5)


@dataclass
class Case:
    """One kernel at one shape. ``inputs(device)`` builds the same tensors on every call (seeded),
    ``grad_idx`` marks those whose gradients are computed, ``impls`` maps name -> callable or
    a string saying why the implementation is not available."""
    name: str
    inputs: Callable[[], List[torch.Tensor]]
    grad_idx: Sequence[int]
    impls: Dict[str, object] = field(default_factory=dict)
    note: str = ""


def _gen(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, dtype, device, seed, scale=1.0, requires_grad=False) -> torch.Tensor:
    t = torch.randn(shape, generator=_gen(device, seed), device=device, dtype=torch.float32) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def _liger(attr_path: str):
    """Import liger_kernel.<module>:<name>, or return a string saying why not. The ops come from
    the ``liger_kernel.ops`` package (what Liger's model patches use, after its per-device
    implementation selection), not from the submodules."""
    module, name = attr_path.split(":")
    try:
        mod = __import__(f"liger_kernel.{module}", fromlist=[name])
        return getattr(mod, name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"liger unavailable: {type(exc).__name__}: {exc}"


def build_cases(shape: dict, dtype, device, names: Sequence[str], compile_backend: str) -> List[Case]:
    b, s, d, inter = shape["batch"], shape["seq"], shape["hidden"], shape["intermediate"]
    hq, hk, hd, vocab, eps = shape["q_heads"], shape["kv_heads"], shape["head_dim"], shape["vocab"], shape["eps"]
    comp = lambda f: torch.compile(f, backend=compile_backend, dynamic=False)
    cases: List[Case] = []
    for name in names:
        if name in ("rms_norm", "rms_norm_dw"):
            dw = name == "rms_norm_dw"
            ref = lambda x, w: rms_norm_reference(x, w, eps)
            case = Case(name, lambda dw=dw: [_randn((b, s, d), dtype, device, 1, requires_grad=True),
                                             (1 + _randn((d,), torch.float32, device, 2, 0.1)).to(dtype)
                                             .requires_grad_(dw)],
                        grad_idx=(0, 1) if dw else (0,), note="dX and dW" if dw else "dX only (frozen weight)")
            case.impls = {"sloth": lambda x, w: SK.rms_norm(x, w, eps), "eager": ref, "compile": comp(ref)}
            fn = _liger("ops:LigerRMSNormFunction")
            case.impls["liger"] = fn if isinstance(fn, str) else (
                lambda x, w, fn=fn: fn.apply(x, w, eps, 0.0, "llama", True))
        elif name == "rope":
            def rope_inputs():
                # q/k as the attention projections leave them: [B, S, H, D] storage viewed as [B, H, S, D]
                pos = torch.arange(s, device=device, dtype=torch.float32)
                inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
                ang = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
                cos, sin = ang.cos().to(dtype).expand(b, s, hd).contiguous(), ang.sin().to(dtype).expand(b, s, hd).contiguous()
                return [_randn((b, s, hq, hd), dtype, device, 3, requires_grad=True),
                        _randn((b, s, hk, hd), dtype, device, 4, requires_grad=True), cos, sin]

            def heads_first(f):
                return lambda q, k, cos, sin: f(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            case = Case(name, rope_inputs, grad_idx=(0, 1), note="q and k together, GQA")
            case.impls = {"sloth": heads_first(SK.apply_rope), "eager": heads_first(apply_rope_reference),
                          "compile": comp(heads_first(apply_rope_reference))}
            fn = _liger("ops:LigerRopeFunction")
            case.impls["liger"] = fn if isinstance(fn, str) else heads_first(lambda q, k, c, si, fn=fn: fn.apply(q, k, c, si))
        elif name in ("swiglu", "geglu", "geglu_tanh"):
            inputs = lambda: [_randn((b, s, inter), dtype, device, 5, requires_grad=True),
                              _randn((b, s, inter), dtype, device, 6, requires_grad=True)]
            case = Case(name, inputs, grad_idx=(0, 1))
            if name == "swiglu":
                ref, ours, liger = swiglu_reference, SK.swiglu, _liger("ops:LigerSiLUMulFunction")
            else:
                approx = "tanh" if name == "geglu_tanh" else "none"
                ref = lambda g, u, a=approx: geglu_reference(g, u, a)
                ours = lambda g, u, a=approx: SK.geglu(g, u, a)
                liger = (_liger("ops:LigerGELUMulFunction") if approx == "tanh"
                         else "liger has no erf GeGLU (tanh only)")
            case.impls = {"sloth": ours, "eager": ref, "compile": comp(ref)}
            case.impls["liger"] = liger if isinstance(liger, str) else (lambda g, u, fn=liger: fn.apply(g, u))
        elif name in MOE_KERNELS:
            case = _moe_case(name, dtype, device, smoke=shape == SMOKE)
        elif name == "fused_ce":
            def ce_inputs():
                labels = torch.randint(0, vocab, (b * s,), generator=_gen(device, 9), device=device)
                return [_randn((b * s, d), dtype, device, 7, requires_grad=True),
                        _randn((vocab, d), dtype, device, 8, scale=0.02), labels]

            def eager_ce(h, w, y):
                return F.cross_entropy((h @ w.t()).float(), y)
            case = Case(name, ce_inputs, grad_idx=(0,),
                        note="lm_head frozen (LoRA); eager = logits.float() + F.cross_entropy, as HF does")
            case.impls = {"sloth": lambda h, w, y: SK.fused_linear_cross_entropy(h, w, y), "eager": eager_ce,
                          "compile": comp(eager_ce),
                          "torch_chunked": lambda h, w, y: fused_linear_cross_entropy_reference(h, w, y)}
            fn = _liger("transformers.functional:liger_fused_linear_cross_entropy")
            case.impls["liger"] = fn if isinstance(fn, str) else (lambda h, w, y, fn=fn: fn(h, w, y))
        else:
            raise SystemExit(f"unknown kernel {name!r}; choose from {', '.join(KERNELS)}")
        cases.append(case)
    return cases


# tokens (batch x seq), hidden, expert intermediate, experts, top-k
MOE_SHAPES = {"moe_qwen3_30b_a3b": (2 * 2048, 2048, 768, 128, 8), "moe_mixtral_8x7b": (4096, 4096, 14336, 8, 2),
              "moe_glm45_air": (2 * 2048, 4096, 1408, 128, 8)}     # GLM-4.5-Air's routed experts
MOE_LORA_RANK = 16
MOE_SMOKE = (48, 64, 32, 8, 2)
_BATCHED_MM_LIMIT = 32 * 2**30      # batched_mm gathers one [2I, H] weight per (token, expert) pair


def _moe_case(name: str, dtype, device, smoke: bool) -> Case:
    """The experts of one MoE layer, forward+backward: x, routing weights and both expert weight stacks
    get gradients (full fine-tuning of the experts; LoRA on them differentiates the same tensors).
    Routing from a random router (softmax, top-k, renormalised), the same for every implementation.
    "eager" / "grouped_mm" / "batched_mm": transformers' own experts module (Qwen3-MoE's class, which
    Mixtral's matches) with that ``experts_implementation``, on our tensors (``functional_call``)."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qm

    from sloth_plugins.kernels.moe import ExpertLora
    lora = name.endswith("_lora")
    tokens, hidden, inter, experts, top_k = MOE_SMOKE if smoke else MOE_SHAPES[name.removesuffix("_lora")]
    r, scale = MOE_LORA_RANK, 2.0

    def inputs():
        logits = _randn((tokens, experts), torch.float32, device, 21)
        weights, index = torch.topk(logits.softmax(-1), top_k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(dtype).requires_grad_()
        base = [_randn((tokens, hidden), dtype, device, 22, requires_grad=True), index, weights,
                _randn((experts, 2 * inter, hidden), dtype, device, 23, hidden ** -0.5, requires_grad=not lora),
                _randn((experts, hidden, inter), dtype, device, 24, inter ** -0.5, requires_grad=not lora)]
        if not lora:
            return base
        # PEFT's target_parameters layout per stack: A [E·r, in], B [out, r·E]
        return base + [_randn((experts * r, hidden), dtype, device, 25, hidden ** -0.5, requires_grad=True),
                       _randn((2 * inter, r * experts), dtype, device, 26, 0.02, requires_grad=True),
                       _randn((experts * r, inter), dtype, device, 27, inter ** -0.5, requires_grad=True),
                       _randn((hidden, r * experts), dtype, device, 28, 0.02, requires_grad=True)]

    def factors(A, B):
        return A.reshape(experts, r, A.shape[1]), B.reshape(B.shape[0], r, experts).permute(2, 0, 1)

    def peft_weight(W, A, B):
        """What PEFT's parametrization hands the experts module for one adapter: baddbmm(W, B, A, alpha=s)."""
        a, b = factors(A, B)
        return torch.baddbmm(W, b, a, alpha=scale)

    def transformers_experts(implementation: str):
        config = qm.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                                   num_experts_per_tok=top_k, hidden_act="silu")
        config._experts_implementation = implementation
        with torch.device("meta"):
            module = qm.Qwen3MoeExperts(config)

        def run(x, index, weights, gate_up, down, *adapters):
            if adapters:
                gate_up, down = peft_weight(gate_up, *adapters[:2]), peft_weight(down, *adapters[2:])
            return torch.func.functional_call(module, {"gate_up_proj": gate_up, "down_proj": down},
                                              (x, index, weights))
        return run

    def ours(x, index, weights, gate_up, down, *adapters):
        loras = [ExpertLora(*factors(*adapters[i:i + 2]), scale) for i in (0, 2)] if adapters else [None, None]
        return SK.moe_experts(x, index, weights, gate_up, down, "swiglu", *loras)

    what = (f"LoRA r={r} on both stacks (PEFT target_parameters; transformers' rows get W + s·B·A as PEFT's "
            f"parametrization builds it): grads of x, routing weights and the adapters") if lora else \
        "grads of x, routing weights and both expert stacks"
    case = Case(name, inputs, grad_idx=(0, 2, 5, 6, 7, 8) if lora else (0, 2, 3, 4),
                note=f"{tokens} tokens, hidden {hidden}, expert inter {inter}, {experts} experts, top-{top_k}; {what}")
    case.impls = {"sloth": ours, "eager": transformers_experts("eager"),
                  "grouped_mm": transformers_experts("grouped_mm"),
                  "compile": "not measured for the MoE block (data-dependent shapes)"}
    pairs_bytes = tokens * top_k * 2 * inter * hidden * torch.finfo(dtype).bits // 8
    case.impls["batched_mm"] = (transformers_experts("batched_mm") if pairs_bytes <= _BATCHED_MM_LIMIT else
                                f"batched_mm would gather {pairs_bytes / 2**30:.0f} GiB of expert weights "
                                f"(one [2I, H] per token-expert pair)")
    return case


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _grad_outputs(outs: tuple, device, seed: int = 11) -> Optional[list]:
    if all(o.dim() == 0 for o in outs):
        return None                       # a scalar loss: backward from 1
    return [_randn(o.shape, o.dtype, device, seed + i) for i, o in enumerate(outs)]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference_results(case: Case, device) -> tuple:
    args = case.inputs()
    outs = _as_tuple(case.impls["eager"](*args))
    grads = torch.autograd.grad(outs, [args[i] for i in case.grad_idx], _grad_outputs(outs, device))
    return [o.detach() for o in outs], [g.detach() for g in grads]


def measure(case: Case, impl: str, fn, ref, device, args) -> dict:
    row = {"kernel": case.name, "impl": impl}
    inputs = case.inputs()
    diff = [inputs[i] for i in case.grad_idx]

    def forward():
        return _as_tuple(fn(*inputs))

    t0 = time.perf_counter()
    outs = forward()                                   # first call: compile / autotune / JIT
    gouts = _grad_outputs(outs, device)
    grads = torch.autograd.grad(outs, diff, [g.clone() for g in gouts] if gouts else None)
    C.sync(device)
    row["first_call_s"] = time.perf_counter() - t0
    ref_outs, ref_grads = ref
    row["rel_err"] = max(_rel_err(a, b) for a, b in zip(list(outs) + list(grads), ref_outs + ref_grads))
    del outs, grads

    inputs[:] = case.inputs()                          # fresh values (some impls work in place)
    diff[:] = [inputs[i] for i in case.grad_idx]
    gouts = _grad_outputs(forward(), device)
    fwdbwd = lambda: torch.autograd.grad(forward(), diff, gouts)
    fwdbwd()
    C.sync(device)
    kw = dict(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    row["fwd_ms"] = C.bench_ms(forward, device, **kw)
    row["fwd_peak_mib"] = _mib(C.peak_extra_bytes(forward, device))
    row["fwdbwd_ms"] = C.bench_ms(fwdbwd, device, **kw)
    row["fwdbwd_peak_mib"] = _mib(C.peak_extra_bytes(fwdbwd, device))
    graph = forward()
    backward = lambda: torch.autograd.grad(graph, diff, gouts, retain_graph=True)
    row["bwd_ms"] = C.bench_ms(backward, device, **kw)
    row["bwd_peak_mib"] = _mib(C.peak_extra_bytes(backward, device))
    graph = None  # release the retained graph (the lambda above reads it)
    return row


def _mib(x: Optional[int]) -> Optional[float]:
    return None if x is None else x / C.MiB


def run(args) -> dict:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        torch.set_num_threads(1)          # tiny CPU ops: extra threads only spin on a busy host
    shape = dict(SMOKE if args.smoke else LLAMA3_8B)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    try:
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False
    except (ImportError, AttributeError):
        pass
    kernels = args.kernels.split(",") if args.kernels else KERNELS
    impls = args.impls.split(",") if args.impls else IMPLS
    if args.smoke:
        impls = [i for i in impls if i != "liger"]     # Liger's Triton kernels have no CPU path
    out_dir = Path(args.out_dir)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), dtype {dtype}, "
          f"shape {shape}, compile backend {args.compile_backend}, kernels {kernels}, impls {impls}", flush=True)
    payload = {"config": {"shape": shape, "dtype": str(dtype), "device": str(device), "kernels": kernels,
                          "impls": impls, "compile_backend": args.compile_backend, "warmup_ms": args.warmup_ms,
                          "rep_ms": args.rep_ms, "smoke": args.smoke}, "notes": {}, "rows": []}
    start = time.perf_counter()
    for case in build_cases(shape, dtype, device, kernels, args.compile_backend):
        payload["notes"][case.name] = case.note
        ref = reference_results(case, device)
        for impl in impls:
            fn = case.impls.get(impl)
            if fn is None:
                continue
            if isinstance(fn, str):
                payload["rows"].append({"kernel": case.name, "impl": impl, "skipped": fn})
                print(f"  {case.name:<12} {impl:<13} skipped: {fn}", flush=True)
                continue
            if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
                payload["rows"].append({"kernel": case.name, "impl": impl,
                                        "skipped": f"time budget of {args.time_budget_s:.0f} s spent"})
                print(f"  {case.name:<12} {impl:<13} skipped: time budget spent", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                row = measure(case, impl, fn, ref, device, args)
            except Exception as exc:  # noqa: BLE001 - one failing implementation must not end the run
                row = {"kernel": case.name, "impl": impl, "error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            row["wall_s"] = time.perf_counter() - t0
            payload["rows"].append(row)
            print(f"  {case.name:<12} {impl:<13} " + (
                f"error {row['error']}" if "error" in row else
                f"fwd {row['fwd_ms']:.3f} ms  bwd {row['bwd_ms']:.3f} ms  fwd+bwd {row['fwdbwd_ms']:.3f} ms  "
                f"rel err {row['rel_err']:.1e}  first call {row['first_call_s']:.1f} s")
                + f"  [{row['wall_s']:.1f} s, total {time.perf_counter() - start:.0f} s]", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del ref
        C.write_json(out_dir / "kernels.json", payload)     # after each kernel: partial results survive a kill
    payload["total_s"] = time.perf_counter() - start
    path = C.write_json(out_dir / "kernels.json", payload)
    print()
    print(report_table(payload["rows"]))
    title = (f"tokens {shape['batch']}x{shape['seq']}, hidden {shape['hidden']}, inter {shape['intermediate']}, "
             f"heads {shape['q_heads']}/{shape['kv_heads']}x{shape['head_dim']}, vocab {shape['vocab']}, {dtype} "
             f"on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    plot = plot_results(payload["rows"], out_dir / "kernels.png", title)
    print(f"\nwrote {path}" + (f" and {plot}" if plot else "") + f" in {payload['total_s']:.0f} s")
    return payload


def report_table(rows: List[dict]) -> str:
    by = {(r["kernel"], r["impl"]): r for r in rows}
    headers = ["kernel", "impl", "fwd ms", "bwd ms", "f+b ms", "f+b vs eager", "f+b vs compile",
               "fwd MiB", "bwd MiB", "f+b MiB", "rel err", "1st call s"]
    lines = []
    for r in rows:
        if "fwdbwd_ms" not in r:
            lines.append([r["kernel"], r["impl"]] + [(r.get("error") or r.get("skipped", ""))[:70]] + [""] * 9)
            continue
        speed = lambda other: (by[(r["kernel"], other)]["fwdbwd_ms"] / r["fwdbwd_ms"]
                               if "fwdbwd_ms" in by.get((r["kernel"], other), {}) else None)
        e, c = speed("eager"), speed("compile")
        lines.append([r["kernel"], r["impl"], r["fwd_ms"], r["bwd_ms"], r["fwdbwd_ms"],
                      f"{e:.2f}x" if e else "-", f"{c:.2f}x" if c else "-",
                      r["fwd_peak_mib"], r["bwd_peak_mib"], r["fwdbwd_peak_mib"], f"{r['rel_err']:.1e}",
                      f"{r['first_call_s']:.1f}"])
    return (C.text_table(headers, lines, left=2)
            + "\n(speed-ups are eager or compile time / this time, forward+backward; MiB = peak extra memory)")


def plot_results(rows: List[dict], path: Path, title: str):
    ok = [r for r in rows if "fwdbwd_ms" in r]
    eager = {r["kernel"]: r for r in ok if r["impl"] == "eager"}
    panels = []
    for mode, label in (("fwd", "forward"), ("bwd", "backward"), ("fwdbwd", "forward+backward")):
        groups: Dict[str, Dict[str, Optional[float]]] = {}
        for r in ok:
            base = eager.get(r["kernel"], {}).get(f"{mode}_ms")
            groups.setdefault(r["kernel"], {})[r["impl"]] = (r[f"{mode}_ms"] / base) if base else None
        panels.append({"title": f"{label} time", "ylabel": "time / eager time (log)", "groups": groups,
                       "hline": 1.0, "log": True})
    mem: Dict[str, Dict[str, Optional[float]]] = {}
    for r in ok:
        mem.setdefault(r["kernel"], {})[r["impl"]] = r["fwdbwd_peak_mib"]
    if any(v for g in mem.values() for v in g.values()):
        panels.append({"title": "forward+backward peak extra memory", "ylabel": "MiB", "groups": mem, "log": True})
    return C.plot_panels(path, panels, title) if panels else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="", help=f"comma-separated subset of {','.join(KERNELS + MOE_KERNELS)} "
                                                 f"(default: all but the MoE blocks {','.join(MOE_KERNELS)})")
    p.add_argument("--impls", default="", help=f"comma-separated subset of {','.join(IMPLS)} (default all; "
                                               f"torch_chunked only exists for fused_ce)")
    p.add_argument("--warmup-ms", type=float, default=50.0)
    p.add_argument("--rep-ms", type=float, default=200.0)
    p.add_argument("--time-budget-s", type=float, default=210.0,
                   help="skip the remaining measurements once this much time has passed (0: no limit)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                                                           "eager under --smoke)")
    p.add_argument("--out-dir", default=None, help="where kernels.json/png go (default benchmarks/results; "
                                                   "a temp folder under --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, CPU, no Liger: checks the code paths")
    args = p.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.smoke else "inductor"
    if args.out_dir is None:
        import tempfile
        args.out_dir = (Path(tempfile.gettempdir()) / "sloth_bench_smoke") if args.smoke else C.RESULTS_DIR
    if args.smoke:
        args.warmup_ms, args.rep_ms = min(args.warmup_ms, 5.0), min(args.rep_ms, 10.0)
    payload = run(args)
    errors = [r for r in payload["rows"] if "error" in r]
    bad = [r for r in payload["rows"] if "rel_err" in r and not (r["rel_err"] <= (1e-4 if args.smoke else 5e-2))]
    for r in bad:
        print(f"WARNING: {r['kernel']}/{r['impl']} relative error {r['rel_err']:.2e} vs eager", flush=True)
    return 1 if (args.smoke and (errors or bad)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
