"""PatchReport: what was patched, per module kind, and what fell back and why."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class PatchEntry:
    kind: str          # "rms_norm", "rope", "mlp", "loss", "gradient_checkpointing", ...
    path: str          # module path inside the model, or "" for model-wide patches
    patched: bool
    detail: str = ""   # the implementation used, or why it fell back


@dataclass
class PatchReport:
    model_type: str = "unknown"
    architecture: Optional[str] = None   # the table entry used, None for the generic paths
    device: str = "cpu"
    triton: str = ""
    entries: List[PatchEntry] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def patched(self, kind: str, path: str = "", detail: str = "") -> PatchEntry:
        """Record a patch; the entry is returned so that a plugin which learns more at run time
        (the loss, on its first training step) can revise what it claimed."""
        self.entries.append(PatchEntry(kind, path, True, detail))
        return self.entries[-1]

    def fallback(self, kind: str, reason: str, path: str = "") -> PatchEntry:
        self.entries.append(PatchEntry(kind, path, False, reason))
        return self.entries[-1]

    def note(self, text: str) -> None:
        self.notes.append(text)

    def count(self, kind: str, patched: bool = True) -> int:
        return sum(1 for e in self.entries if e.kind == kind and e.patched == patched)

    def kinds(self) -> List[str]:
        return list(OrderedDict.fromkeys(e.kind for e in self.entries))

    def fallbacks(self) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = OrderedDict()
        for e in self.entries:
            if not e.patched:
                out.setdefault(e.kind, []).append(f"{e.path}: {e.detail}" if e.path else e.detail)
        return out

    def summary(self) -> Dict[str, dict]:
        """Per kind: number patched, number fallen back, the distinct details of each."""
        out: Dict[str, dict] = OrderedDict()
        for e in self.entries:
            s = out.setdefault(e.kind, {"patched": 0, "fallback": 0, "how": [], "why": []})
            s["patched" if e.patched else "fallback"] += 1
            bucket = s["how" if e.patched else "why"]
            if e.detail and e.detail not in bucket:
                bucket.append(e.detail)
        return out

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "architecture": self.architecture, "device": self.device,
                "triton": self.triton, "summary": self.summary(), "notes": list(self.notes),
                "entries": [e.__dict__.copy() for e in self.entries]}

    def __str__(self) -> str:
        arch = self.architecture or "generic (no architecture entry)"
        lines = [f"sloth_plugins PatchReport: model_type={self.model_type} arch={arch} device={self.device}",
                 f"  {self.triton}" if self.triton else ""]
        for kind, s in self.summary().items():
            line = f"  {kind:<24} patched {s['patched']:>3}"
            if s["how"]:
                line += f"  [{'; '.join(s['how'])}]"
            if s["fallback"]:
                line += f"  fell back {s['fallback']}: {'; '.join(s['why'])}"
            lines.append(line)
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(line for line in lines if line)
