"""Attention benchmark: sloth's Triton varlen kernel vs SDPA (flash, cuDNN, masked) and
FlexAttention, full-length rows and packed rows, Llama-3-8B heads (32 q / 8 kv, d=128), bf16.

    python benchmarks/attention.py                      # 2k..32k tokens, both layouts (< 3 min on an H200)
    python benchmarks/attention.py --seqs 4096,16384 --impls sloth,flex
    python benchmarks/attention.py --tune               # also time alternative launch configs of the kernel
    python benchmarks/attention.py --smoke             # tiny shapes on CPU, the kernel under the interpreter

Layouts, each with T tokens in one row:
  full    one causal sample of T tokens (pre-training style rows);
  packed  long-tailed samples (exponential lengths, mean ~350, at most 2048) concatenated, each
          attending only to itself (padding-free fine-tuning).
Implementations:
  sloth          the Triton kernel (``varlen_attention_triton``) on the token layout
  sdpa_flash     SDPA, flash backend, is_causal; on packed data it runs the samples padded into a
                 [samples, longest] batch (padded fine-tuning)
  sdpa_cudnn     the same with the cuDNN backend
  sdpa_mask      packed only: SDPA with the dense per-sample boolean mask transformers builds for
                 packed rows (efficient backend; the mask is built once, outside the timing)
  flex           FlexAttention (torch.compile'd) with a causal / per-sample block mask
  fa2_varlen     flash_attn.flash_attn_varlen_func, when the flash-attn package is installed
Per row: median ms of the forward and of forward+backward, TFLOP/s counting only the useful
(causal, per-sample) FLOPs, peak extra memory of forward+backward, and the relative error of
the output and of dq/dk/dv against an fp32 reference (T <= --check-max tokens). Prints a table,
writes <out>/attention.json and attention.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import _common as C  # noqa: I001  (first: keeps benchmarks/ off sys.path)

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")       # before the kernels are imported

import torch
import torch.nn.functional as F

from sloth_plugins.kernels import _attention_triton as AT
from sloth_plugins.kernels import attention as A

IMPLS = ["sloth", "sdpa_flash", "sdpa_cudnn", "sdpa_mask", "flex", "fa2_varlen"]
LAYOUTS = ["full", "packed"]
LLAMA3_8B = dict(n_q=32, n_k=8, dim=128, dtype=torch.bfloat16, seqs=[2048, 4096, 8192, 16384, 32768],
                 mean_len=350.0, max_len=2048)
SMOKE = dict(n_q=4, n_k=2, dim=32, dtype=torch.float32, seqs=[48, 96], mean_len=12.0, max_len=40)


def long_tail_lengths(total: int, seed: int, mean: float = 350.0, max_len: int = 2048) -> List[int]:
    gen = torch.Generator().manual_seed(seed)
    lengths: List[int] = []
    while sum(lengths) < total:
        n = int(torch.empty(1).exponential_(1.0 / mean, generator=gen).item()) + 1
        lengths.append(min(n, max_len, total - sum(lengths)))
    return lengths


def causal_flops(lengths: List[int], n_q: int, dim: int) -> float:
    """Forward FLOPs of causal attention: two matmuls over the visible (q, k) pairs."""
    return sum(4.0 * n * (n + 1) / 2 * dim * n_q for n in lengths)


class Problem:
    """One layout at one token count: inputs on the token layout plus what each impl needs."""

    def __init__(self, layout: str, tokens: int, shape: dict, device, seed: int = 0):
        self.layout, self.tokens, self.device = layout, tokens, device
        self.n_q, self.n_k, self.dim, self.dtype = shape["n_q"], shape["n_k"], shape["dim"], shape["dtype"]
        self.lengths = [tokens] if layout == "full" else long_tail_lengths(tokens, seed, shape["mean_len"],
                                                                           shape["max_len"])
        self.max_len = max(self.lengths)
        self.cu = torch.tensor([0] + torch.tensor(self.lengths).cumsum(0).tolist(), dtype=torch.int32,
                               device=device)
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        make = lambda h: (torch.randn(tokens, h, self.dim, generator=gen) * 0.5).to(device, self.dtype)
        self.q, self.k, self.v = make(self.n_q), make(self.n_k), make(self.n_k)
        self.grad = (torch.randn(tokens, self.n_q, self.dim, generator=gen)).to(device, self.dtype)
        self.flops = causal_flops(self.lengths, self.n_q, self.dim)

    def leaves(self):
        return [t.detach().clone().requires_grad_() for t in (self.q, self.k, self.v)]


# Each builder returns (forward(q, k, v) -> out [T, Hq, D], note) or raises / returns a reason string.

def _heads_first(x):                     # [T, H, D] -> [1, H, T, D] (a view)
    return x.transpose(0, 1)[None]


def _sdpa_call(q, k, v, **kw):
    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw), ""
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(q, k, v, **kw), "kv heads repeated (backend has no GQA)"


def build_sloth(p: Problem):
    return lambda q, k, v: AT.varlen_attention_triton(q, k, v, p.cu, p.max_len), ""


def build_sdpa(p: Problem, backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa_mask": SDPBackend.EFFICIENT_ATTENTION}[backend_name]
    if p.device.type != "cuda":
        backend = SDPBackend.MATH
    notes = []
    if backend_name == "sdpa_mask":
        if p.layout == "full":
            return "full rows need no mask (see sdpa_flash)"
        mask = A.segment_mask(A.Segments(None, p.cu, p.max_len, 1, p.tokens))

        def fwd(q, k, v):
            with sdpa_kernel(backend):
                out, note = _sdpa_call(_heads_first(q), _heads_first(k), _heads_first(v), attn_mask=mask)
            notes.append(note)
            return out[0].transpose(0, 1)
        return fwd, f"dense mask {mask.numel() / C.MiB:.0f} MiB built outside the timing"
    if p.layout == "full":
        def fwd(q, k, v):
            with sdpa_kernel(backend):
                out, note = _sdpa_call(_heads_first(q), _heads_first(k), _heads_first(v), is_causal=True)
            notes.append(note)
            return out[0].transpose(0, 1)
        return fwd, ""
    # packed samples padded into [samples, longest]: the padded fine-tuning baseline
    n, longest = len(p.lengths), p.max_len
    starts = p.cu[:-1].long()
    offs = torch.arange(longest, device=p.device)
    valid = offs[None, :] < torch.tensor(p.lengths, device=p.device)[:, None]
    src = (starts[:, None] + offs[None, :]).clamp(max=p.tokens - 1)

    def fwd(q, k, v):
        pad = lambda x: (x[src] * valid[..., None, None]).transpose(1, 2)     # [N, H, L, D]
        with sdpa_kernel(backend):
            out, note = _sdpa_call(pad(q), pad(k), pad(v), is_causal=True)
        notes.append(note)
        return out.transpose(1, 2)[valid]                                     # back to [T, H, D]
    return fwd, f"{n} samples padded to {longest} ({n * longest / p.tokens:.1f}x the tokens)"


def build_flex(p: Problem, compile_flex: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    sample = torch.repeat_interleave(torch.arange(len(p.lengths), device=p.device),
                                     torch.tensor(p.lengths, device=p.device))

    def mask_mod(b, h, q_idx, kv_idx):
        return (sample[q_idx] == sample[kv_idx]) & (kv_idx <= q_idx)

    block_mask = create_block_mask(mask_mod, None, None, p.tokens, p.tokens, device=p.device)
    # default dynamic=None: the second token count recompiles with a dynamic length, later ones reuse it
    fn = torch.compile(flex_attention) if compile_flex else flex_attention

    def fwd(q, k, v):
        out = fn(_heads_first(q), _heads_first(k), _heads_first(v), block_mask=block_mask, enable_gqa=True)
        return out[0].transpose(0, 1)
    return fwd, "torch.compile'd" if compile_flex else "eager"


def build_fa2(p: Problem):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return "flash-attn not installed"
    return (lambda q, k, v: flash_attn_varlen_func(q, k, v, p.cu, p.cu, p.max_len, p.max_len, causal=True)), ""


def builder(impl: str, p: Problem, args) -> object:
    if impl == "sloth":
        return build_sloth(p)
    if impl.startswith("sdpa"):
        if p.device.type != "cuda" and impl == "sdpa_cudnn":
            return "CPU: SDPA's math backend only (the sdpa_flash and sdpa_mask rows)"
        return build_sdpa(p, impl)
    if impl == "flex":
        if p.device.type != "cuda":
            return "CPU: FlexAttention has no backward there"
        return build_flex(p, compile_flex=True)
    if impl == "fa2_varlen":
        if p.device.type != "cuda":
            return "CUDA only"
        return build_fa2(p)
    raise ValueError(impl)


def reference(p: Problem):
    q, k, v = (t.float().requires_grad_() for t in p.leaves())
    out = A.varlen_attention_reference(q, k, v, p.cu)
    grads = torch.autograd.grad(out, (q, k, v), p.grad.float())
    return (out.detach(), *grads)


def _rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def measure(impl: str, p: Problem, ref, args) -> dict:
    row = {"layout": p.layout, "tokens": p.tokens, "samples": len(p.lengths), "impl": impl}
    built = builder(impl, p, args)
    if isinstance(built, str):
        row["skipped"] = built
        return row
    fwd, note = built
    if note:
        row["note"] = note
    q, k, v = p.leaves()
    started = time.perf_counter()
    out = fwd(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), p.grad)
    C.sync(p.device)
    row["first_call_s"] = time.perf_counter() - started
    if ref is not None:
        row["rel_err"] = max(_rel_err(x, r) for x, r in zip((out.detach(), *grads), ref))
    del out, grads

    def forward():
        with torch.no_grad():
            fwd(p.q, p.k, p.v)

    def forward_backward():
        o = fwd(q, k, v)
        torch.autograd.grad(o, (q, k, v), p.grad)

    row["fwd_ms"] = _time_ms(forward, p.device, args)
    row["fwdbwd_ms"] = _time_ms(forward_backward, p.device, args)
    row["fwd_tflops"] = p.flops / row["fwd_ms"] / 1e9
    row["fwdbwd_tflops"] = 3.5 * p.flops / row["fwdbwd_ms"] / 1e9
    peak = C.peak_extra_bytes(forward_backward, p.device)
    row["peak_mib"] = peak / C.MiB if peak is not None else None
    return row


def _time_ms(fn, device, args) -> float:
    if args.smoke:                        # the interpreter is slow: one call checks the code path
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    return C.bench_ms(fn, device, args.warmup_ms, args.rep_ms)


def tune(p: Problem, args) -> List[dict]:
    """Time alternative launch configurations of each kernel (fwd, dkdv, dq) on one problem."""
    candidates = {
        "fwd": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4)],
        "dkdv": [(32, 128, 8, 2), (32, 128, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2)],
        "dq": [(128, 32, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
    }
    q, k, v = p.leaves()
    out = AT.varlen_attention_triton(q, k, v, p.cu, p.max_len)
    rows = []
    for kernel, configs in candidates.items():
        for cfg in configs:
            AT.set_config(kernel, *cfg)
            try:
                if kernel == "fwd":
                    fn = lambda: AT._forward(p.q, p.k, p.v, p.cu, p.max_len, p.dim ** -0.5, True, 0, 0.0)
                else:
                    lse = AT._forward(p.q, p.k, p.v, p.cu, p.max_len, p.dim ** -0.5, True, 0, 0.0)[1]
                    fn = lambda: AT._backward(p.grad, p.q, p.k, p.v, out.detach(), lse, p.cu, p.max_len,
                                              p.dim ** -0.5, True, 0, 0.0)
                ms = C.bench_ms(fn, p.device, args.warmup_ms, args.rep_ms)
                rows.append({"kernel": kernel, "config": cfg, "ms": ms, "layout": p.layout, "tokens": p.tokens})
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
                rows.append({"kernel": kernel, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:200]})
            finally:
                AT.clear_configs()
    return rows


def run(args) -> dict:
    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    shape = dict(SMOKE if smoke else LLAMA3_8B)
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else shape["seqs"]
    impls = [i for i in (args.impls.split(",") if args.impls else IMPLS) if i]
    layouts = [x for x in (args.layouts.split(",") if args.layouts else LAYOUTS) if x]
    deadline = time.perf_counter() + args.time_budget_s if args.time_budget_s else None
    rows: List[dict] = []
    progress = C.Progress(len(seqs) * len(layouts) * len(impls), "attention")
    for layout in layouts:
        for tokens in seqs:
            p = Problem(layout, tokens, shape, device)
            ref = reference(p) if tokens <= args.check_max else None
            for impl in impls:
                if deadline is not None and time.perf_counter() > deadline:
                    rows.append({"layout": layout, "tokens": tokens, "impl": impl, "skipped": "time budget"})
                    progress.update()
                    continue
                try:
                    row = measure(impl, p, ref, args)
                except Exception as exc:  # noqa: BLE001 - one failing implementation must not end the run
                    row = {"layout": layout, "tokens": tokens, "samples": len(p.lengths), "impl": impl,
                           "error": f"{type(exc).__name__}: {exc}"[:300]}
                    if args.verbose:
                        traceback.print_exc()
                rows.append(row)
                progress.update()
                if "fwd_ms" in row:
                    progress.write(f"{layout:6} {tokens:>6} {impl:11} fwd {row['fwd_ms']:8.3f} ms  fwd+bwd "
                                   f"{row['fwdbwd_ms']:8.3f} ms  {row['fwdbwd_tflops']:7.1f} TFLOP/s")
            del p, ref
    tuned = []
    if args.tune and not smoke:
        for layout in layouts:
            tuned += tune(Problem(layout, 8192, shape, device), args)
    progress.close()
    payload = {"shape": {k: str(v) for k, v in shape.items()}, "rows": rows, "tune": tuned}
    report(payload, args, device)
    return payload


def report(payload: dict, args, device) -> None:
    rows = payload["rows"]
    headers = ["layout", "tokens", "samples", "impl", "fwd ms", "fwd+bwd ms", "TFLOP/s fwd", "TFLOP/s f+b",
               "peak MiB", "rel err", "note"]
    table = []
    for r in rows:
        note = r.get("error") or r.get("skipped") or r.get("note", "")
        table.append([r["layout"], str(r["tokens"]), str(r.get("samples", "")), r["impl"], r.get("fwd_ms"),
                      r.get("fwdbwd_ms"), r.get("fwd_tflops"), r.get("fwdbwd_tflops"), r.get("peak_mib"),
                      f"{r['rel_err']:.1e}" if "rel_err" in r else "-", note[:60]])
    print(C.text_table(headers, table, left=4))
    if payload["tune"]:
        print("\nlaunch configurations (BLOCK_M, BLOCK_N, warps, stages), 8192 tokens:")
        print(C.text_table(["kernel", "layout", "config", "ms"],
                           [[t["kernel"], t.get("layout", ""), str(t["config"]), t.get("ms", t.get("error"))]
                            for t in payload["tune"]], left=3))
    out_dir = Path(args.out_dir)
    path = C.write_json(out_dir / "attention.json", payload)
    panels = []
    for layout in LAYOUTS:
        groups: Dict[str, Dict[str, Optional[float]]] = {}
        for r in rows:
            if r["layout"] == layout and "fwdbwd_tflops" in r:
                groups.setdefault(f"{r['tokens'] // 1024}k" if r["tokens"] >= 1024 else str(r["tokens"]),
                                  {})[r["impl"]] = r["fwdbwd_tflops"]
        if groups:
            panels.append({"title": f"{layout} rows: forward+backward", "ylabel": "useful TFLOP/s",
                           "groups": groups})
    plot = C.plot_panels(out_dir / "attention.png", panels, title=f"attention, {device}") if panels else None
    print(f"\nwrote {path}" + (f" and {plot}" if plot else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="", help="comma-separated token counts per row (default 2k..32k)")
    p.add_argument("--impls", default="", help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--layouts", default="", help="full,packed (default both)")
    p.add_argument("--check-max", type=int, default=8192, help="fp32 reference check up to this many tokens")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--time-budget-s", type=float, default=170.0,
                   help="skip the remaining measurements once this much time has passed (0: no limit)")
    p.add_argument("--tune", action="store_true", help="also time alternative launch configs of the kernel")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (a temp folder under --smoke)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing implementations")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, CPU, Triton interpreter")
    args = p.parse_args(argv)
    if args.out_dir is None:
        import tempfile
        args.out_dir = (Path(tempfile.gettempdir()) / "sloth_bench_smoke") if args.smoke else C.RESULTS_DIR
    payload = run(args)
    rows = payload["rows"]
    bound = 1e-4 if args.smoke else 5e-2
    bad = [r for r in rows if "error" in r or ("rel_err" in r and not r["rel_err"] <= bound)]
    for r in bad:
        print(f"WARNING: {r['layout']}/{r['tokens']}/{r['impl']}: {r.get('error') or r['rel_err']}", flush=True)
    return 1 if (args.smoke and bad) else 0


if __name__ == "__main__":
    raise SystemExit(main())
