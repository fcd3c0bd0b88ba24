"""Tokens/s against peak GiB, one point per implementation, one panel per scenario; the Pareto
front (no other point both faster and lighter) drawn as a line, its points filled, the others
hollow. Failed implementations are listed under the panel. PNG with matplotlib, else SVG."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import _common as C  # loaded by whoever imports slothbench


def pareto(points: List[tuple]) -> List[tuple]:
    """The (GiB, tok/s, name) points no other point dominates (<= GiB and >= tok/s, one strictly)."""
    front = [p for p in points if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1])
                                          for q in points)]
    return sorted(front)


def _panels(rows: List[dict]) -> Dict[str, dict]:
    panels: Dict[str, dict] = {}
    for r in rows:
        panel = panels.setdefault(r["scenario"], {"points": [], "failed": []})
        speed = r.get("real_tok_s") or r.get("tok_s")
        if r.get("ok") and speed:
            panel["points"].append((r.get("peak_gib") or 0.0, speed, r["impl"]))
        elif not r.get("skipped"):
            panel["failed"].append(r["impl"])
    return panels


def plot(rows: List[dict], path, title: str = "") -> Optional[Path]:
    panels = {k: v for k, v in _panels(rows).items() if v["points"] or v["failed"]}
    if not panels:
        return None
    path = Path(path)
    plt = C.pyplot_for(path)
    if plt is None:
        return _svg(path.with_suffix(".svg"), panels, title)
    cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(5.2 * cols, 4.2 * n_rows), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (name, panel) in zip(axes.flat, panels.items()):
        front = pareto(panel["points"])
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], color="0.6", lw=1.0, ls="--", zorder=1,
                    label="Pareto front")
        for i, (x, y, impl) in enumerate(sorted(panel["points"], key=lambda p: -p[1])):
            color, on = colors[i % len(colors)], (x, y, impl) in front
            # the legend carries the numbers: labels beside points collide when the points are close
            ax.scatter([x], [y], s=70, zorder=2, facecolors=color if on else "none", edgecolors=color,
                       linewidths=1.5, label=f"{impl}: {y:,.0f} tok/s, {x:.2f} GiB" + ("" if on else " (dominated)"))
        xs = [p[0] for p in panel["points"]] or [1.0]
        ys = [p[1] for p in panel["points"]] or [1.0]
        ax.set_xlim(0, max(xs) * 1.2 or 1.0)
        ax.set_ylim(0, max(ys) * 1.35 or 1.0)     # room for the legend above the points
        ax.grid(alpha=0.3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("peak GiB (max_memory_allocated; 0: not measured)")
        ax.set_ylabel("tokens/s (real tokens)")
        if panel["failed"]:
            ax.text(0.01, 0.01, "failed: " + ", ".join(panel["failed"]), transform=ax.transAxes, fontsize=7,
                    color="tab:red")
        if panel["points"]:
            ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _svg(path: Path, panels: Dict[str, dict], title: str) -> Path:
    w, h, pad = 380, 300, 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(panels)}" height="{h + 2 * pad}" '
           f'font-family="sans-serif" font-size="10"><text x="5" y="14">{title}</text>']
    for i, (name, panel) in enumerate(panels.items()):
        x0, pts = i * w + pad, panel["points"]
        xmax = max([p[0] for p in pts] + [1e-9]) * 1.1
        ymax = max([p[1] for p in pts] + [1e-9]) * 1.1
        xy = lambda p: (x0 + (w - 2 * pad) * p[0] / xmax, pad + h - h * p[1] / ymax)
        out.append(f'<text x="{x0}" y="30">{name}: tokens/s vs peak GiB</text>')
        front = pareto(pts)
        if len(front) > 1:
            out.append('<polyline fill="none" stroke="green" points="'
                       + " ".join(f"{a:.1f},{b:.1f}" for a, b in map(xy, front)) + '"/>')
        for p in pts:
            a, b = xy(p)
            fill = "green" if p in front else "none"
            out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="4" fill="{fill}" stroke="green"/>'
                       f'<text x="{a + 5:.1f}" y="{b - 5:.1f}">{p[2]}</text>')
        if panel["failed"]:
            out.append(f'<text x="{x0}" y="{h + pad + 20}" fill="red">failed: {", ".join(panel["failed"])}</text>')
    path.write_text("\n".join(out + ["</svg>"]))
    return path
