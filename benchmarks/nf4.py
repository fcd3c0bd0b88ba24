"""NF4 dequantization benchmark: sloth's Triton kernel vs bitsandbytes' CUDA kernel.

    python benchmarks/nf4.py              # Llama-3-8B projection shapes, bf16 output, double quant
    python benchmarks/nf4.py --smoke      # tiny shapes on CPU (torch reference vs bitsandbytes' CPU path)

Per weight shape: median milliseconds of one dequantization into a reused output buffer, the
effective bandwidth (packed bytes + absmax read, output written) and whether the outputs are equal
bit for bit. QLoRA dequantizes every base weight three times a step with checkpointing (forward,
recompute, backward): the last column is that cost for the 7 projections of all 32 layers.
Prints a table, writes <out>/nf4.json and nf4.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _common as C  # noqa: I001  (first: keeps benchmarks/ off sys.path)
import torch

from sloth_plugins.kernels.nf4 import QuantState4bit, dequantize_4bit, dequantize_4bit_reference

SHAPES_8B = {"q/o 4096x4096": ((4096, 4096), 2), "k/v 1024x4096": ((1024, 4096), 2),
             "gate/up/down 14336x4096": ((14336, 4096), 3)}
SHAPES_SMOKE = {"tiny 64x128": ((64, 128), 1)}
LAYERS_8B = 32


def _quantize(shape, device):
    import bitsandbytes.functional as bnbf
    w = torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed, qs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--rep-ms", type=float, default=200.0)
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    import bitsandbytes.functional as bnbf
    shapes = SHAPES_SMOKE if device.type == "cpu" else SHAPES_8B
    ours = dequantize_4bit if device.type == "cuda" else dequantize_4bit_reference
    rows, per_step = [], {"sloth": 0.0, "bitsandbytes": 0.0}
    for label, (shape, per_layer) in shapes.items():
        packed, qs = _quantize(shape, device)
        state = QuantState4bit.from_bnb(qs)
        out = torch.empty(shape, dtype=torch.bfloat16, device=device)
        want = bnbf.dequantize_4bit(packed, qs)
        got = ours(packed, state, torch.bfloat16, out=out)
        exact = bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))
        n = shape[0] * shape[1]
        bnb_out = {"out": out} if device.type == "cuda" else {}   # bitsandbytes' CPU op has no out=
        moved = n // 2 + n // 64 + n * 2          # packed bytes + uint8 absmax + bf16 output
        for impl, fn in (("sloth", lambda: ours(packed, state, torch.bfloat16, out=out)),
                         ("bitsandbytes", lambda: bnbf.dequantize_4bit(packed, qs, **bnb_out))):
            ms = C.bench_ms(fn, device, rep_ms=args.rep_ms)
            per_step[impl] += ms * per_layer * (LAYERS_8B if device.type == "cuda" else 1) * 3
            rows.append({"shape": label, "impl": impl, "ms": ms, "gb_s": moved / ms / 1e6, "bit_exact": exact})
    for r in rows:
        r["step_ms_3_passes"] = per_step[r["impl"]]
    print(C.text_table(["shape", "impl", "ms", "GB/s", "bit-exact vs bnb"],
                       [[r["shape"], r["impl"], r["ms"], r["gb_s"], str(r["bit_exact"])] for r in rows]))
    print("per training step (7 projections x 32 layers x 3 passes): "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in per_step.items()))
    out_dir = Path(args.out_dir) if args.out_dir else C.RESULTS_DIR
    path = C.write_json(out_dir / "nf4.json", {"rows": rows, "per_step_ms": per_step, "device": str(device)})
    groups = {}
    for r in rows:
        groups.setdefault(r["shape"], {})[r["impl"]] = r["gb_s"]
    C.plot_panels(out_dir / "nf4.png", [{"title": "NF4 dequant (bf16 out, double quant)", "ylabel": "GB/s",
                                         "groups": groups}])
    print(f"wrote {path}")
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
