"""The meter: peak memory kept across others' resets, garbage-collector time per step.

Timing is the step loop's (benchmarks/run.py): torch.cuda.synchronize() around every step,
tokens/s over the timed steps after the warmup. MFU = FLOPs / time / peak FLOP/s with FLOPs =
4 N_matmul tokens + 6 L d sum(len^2) (slothbench.models.matmul_flops).
"""
from __future__ import annotations

import time
from typing import Optional


class PeakMemory:
    """torch.cuda.max_memory_allocated / max_memory_reserved over a run, kept across resets.

    Other code resets the CUDA peak counters mid-run (sloth's auto checkpointing while it
    measures a step; Axolotl's trainer at every log), which would leave the benchmark with the
    peak since the last reset only. Once one of these exists, every torch.cuda.reset_peak_memory_stats
    in the process first folds the current peaks into ours. ``mark()`` starts a window (our own reset);
    ``peak()``/``window_peak()`` read bytes. Without CUDA every reading is None."""

    def __init__(self, device):
        import torch
        self._torch, self.device = torch, device
        self.cuda = device.type == "cuda"
        self.total, self.window = [0, 0], [0, 0]        # [allocated, reserved]
        self.resets_by_others = 0
        self._reset = torch.cuda.reset_peak_memory_stats
        if self.cuda:
            torch.cuda.reset_peak_memory_stats = torch.cuda.memory.reset_peak_memory_stats = self._reset_by_others

    def _fold(self) -> None:
        if self.cuda:
            cuda = self._torch.cuda
            now = [cuda.max_memory_allocated(self.device), cuda.max_memory_reserved(self.device)]
            self.total = [max(a, b) for a, b in zip(self.total, now)]
            self.window = [max(a, b) for a, b in zip(self.window, now)]

    def _reset_by_others(self, device=None) -> None:
        self._fold()
        self.resets_by_others += 1
        self._reset(device)

    def start(self) -> None:
        """Forget everything before now (the run's start)."""
        self.mark()
        self.total = list(self.window)

    def mark(self) -> None:
        """Start a new window; the run's total keeps what came before."""
        self._fold()
        if self.cuda:
            self._reset(self.device)
        self.window = [0, 0]
        self._fold()

    def peak(self, reserved: bool = False) -> Optional[int]:
        self._fold()
        return self.total[int(reserved)] if self.cuda else None

    def window_peak(self, reserved: bool = False) -> Optional[int]:
        self._fold()
        return self.window[int(reserved)] if self.cuda else None


class GcTime:
    """Time Python's cyclic garbage collector spends inside each step, and its collections per generation."""

    def __init__(self):
        import gc
        self._t0, self.ms, self.counts = None, 0.0, [0, 0, 0]
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.ms += 1e3 * (time.perf_counter() - self._t0)
            self.counts[info["generation"]] += 1

    def start_step(self) -> None:
        self.ms, self.counts = 0.0, [0, 0, 0]

    def end_step(self) -> tuple:
        return round(self.ms, 3), list(self.counts)
