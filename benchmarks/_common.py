"""Shared helpers for the benchmark scripts: timing, memory, tables, JSON, plots, progress.
Importing it also makes the runner's package importable as ``slothbench``.

Import it FIRST in any script under benchmarks/ (before torch, transformers, bitsandbytes):

    import _common as C                      # strips benchmarks/ from sys.path, see below

Running ``python benchmarks/x.py`` puts benchmarks/ on sys.path, where ``kernels.py`` would be
importable as ``kernels`` — the name of Hugging Face's real package, which transformers and
bitsandbytes import when they find it. Importing this module removes that entry (the
module itself is already loaded, so ``import _common`` keeps working).

API (all device-agnostic: CUDA uses do_bench / max_memory_allocated, CPU a wall clock):
    bench_ms(fn, device, warmup_ms=50, rep_ms=200) -> median milliseconds of fn()
    peak_extra_bytes(fn, device) -> bytes fn() allocates on top of what is live before it
                                    (None on CPU)
    sync(device)
    environment() -> dict: date, host, GPU, Python and package versions, command line
    text_table(headers, rows, left=1) -> str  (None cells print as "-")
    write_json(path, payload) -> Path         (adds payload["meta"] = environment())
    plot_panels(path, panels) -> Path|None     grouped bar charts for the micro-benchmarks
                                               (kernels/attention/nf4); PNG via matplotlib, else
                                               an SVG beside it. The runner plots with slothbench.plot
    Progress(total, desc)                      tqdm on a terminal, plain lines otherwise
    MiB, GiB, fmt(x, digits)
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"

sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != HERE]


def _register_slothbench() -> None:
    """``import slothbench`` (benchmarks/slothbench/) without benchmarks/ on sys.path."""
    import importlib.util
    if "slothbench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("slothbench", HERE / "slothbench" / "__init__.py",
                                                      submodule_search_locations=[str(HERE / "slothbench")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["slothbench"] = module
        spec.loader.exec_module(module)


_register_slothbench()

MiB = 2 ** 20
GiB = 2 ** 30

_VERSIONED = ["torch", "triton", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "liger-kernel",
              "unsloth", "unsloth_zoo", "sloth_plugins"]


def _torch():
    import torch
    return torch


def sync(device) -> None:
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], object], device, warmup_ms: float = 50, rep_ms: float = 200) -> float:
    """Median wall time of ``fn()`` in ms. CUDA: triton.testing.do_bench (L2 flushed between calls)."""
    torch = _torch()
    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_event_bench(fn, warmup_ms, rep_ms)
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times: List[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cuda_event_bench(fn, warmup_ms: float, rep_ms: float) -> float:
    torch = _torch()
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / one))):
        fn()
    times = []
    for _ in range(max(3, int(rep_ms / one))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device) -> Optional[int]:
    """Peak bytes allocated during ``fn()`` beyond those live before it; whatever fn returns
    is dropped inside the measurement. None on CPU (no allocator statistics)."""
    torch = _torch()
    if torch.device(device).type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    torch = _torch()
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": platform.node(),
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "versions": {name: _version(name) for name in _VERSIONED},
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{props.name}, {props.total_memory / GiB:.0f} GiB, {torch.cuda.device_count()} visible"
    return env


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:,.{digits}f}"
    return str(x)


def text_table(headers: Sequence[str], rows: Iterable[Sequence], left: int = 1) -> str:
    """Fixed-width table; the first ``left`` columns are left-aligned, the rest right-aligned."""
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in cells])


def write_json(path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": environment(), **payload}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


def pyplot_for(path: Path):
    """matplotlib.pyplot on the Agg backend (None without matplotlib), after creating ``path``'s folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def plot_panels(path, panels: List[dict], title: str = "") -> Optional[Path]:
    """Grouped bar charts side by side. Each panel: {"title", "ylabel", "groups":
    {group: {series: value or None}}, optional "log": bool, "hline": float}.
    Writes PNG with matplotlib; without it an SVG (same name, .svg). Returns the path."""
    path = Path(path)
    plt = pyplot_for(path)
    if plt is None:
        return _plot_svg(path.with_suffix(".svg"), panels, title)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        groups = panel["groups"]
        series = _series(groups)
        width = 0.8 / max(1, len(series))
        for j, name in enumerate(series):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
            ys = [groups[g].get(name) for g in groups]
            ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None],
                   width, label=name)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(list(groups), rotation=30, ha="right", fontsize=8)
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_ylabel(panel.get("ylabel", ""))
        if panel.get("log"):
            ax.set_yscale("log")
        if panel.get("hline") is not None:
            ax.axhline(panel["hline"], color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(groups: Dict[str, Dict[str, Optional[float]]]) -> List[str]:
    out: List[str] = []
    for values in groups.values():
        out += [k for k in values if k not in out]
    return out


def _plot_svg(path: Path, panels: List[dict], title: str) -> Path:
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    pw, ph, top, bottom = 420, 300, 40, 70
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{pw * len(panels)}" height="{ph + top + bottom}" '
             f'font-family="sans-serif" font-size="10"><text x="5" y="14">{title}</text>']
    for p, panel in enumerate(panels):
        groups, x0 = panel["groups"], p * pw
        series = _series(groups)
        vmax = max([v for g in groups.values() for v in g.values() if v is not None] or [1.0])
        parts.append(f'<text x="{x0 + 10}" y="30">{panel.get("title", "")} ({panel.get("ylabel", "")})</text>')
        gw = (pw - 40) / max(1, len(groups))
        for i, (gname, values) in enumerate(groups.items()):
            for j, name in enumerate(series):
                v = values.get(name)
                if v is None:
                    continue
                h = ph * v / vmax
                bx = x0 + 30 + i * gw + j * gw * 0.8 / max(1, len(series))
                parts.append(f'<rect x="{bx:.1f}" y="{top + ph - h:.1f}" width="{gw * 0.8 / len(series):.1f}" '
                             f'height="{h:.1f}" fill="{colors[j % len(colors)]}"><title>{name}: {v:.4g}</title></rect>')
            parts.append(f'<text x="{x0 + 30 + i * gw:.1f}" y="{top + ph + 14}">{gname}</text>')
        for j, name in enumerate(series):
            parts.append(f'<text x="{x0 + 30 + j * 80}" y="{top + ph + 40}" fill="{colors[j % len(colors)]}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path


class Progress:
    """A tqdm bar when stderr is a terminal, else nothing; ``write`` always prints a line."""

    def __init__(self, total: int, desc: str = ""):
        self._bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, leave=False)
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
