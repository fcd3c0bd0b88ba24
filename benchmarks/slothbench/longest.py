"""The longest batch-1 sequence that trains within a memory budget (run "longest").

Each implementation's process caps PyTorch's CUDA caching allocator at ``budget_gib``
(torch.cuda.set_per_process_memory_fraction) and tries lengths (multiples of ``resolution``):
doubling from ``start_seq`` until one fails or ``max_seq`` trains, then bisection, while its time
budget lasts. A try is forward + backward + optimizer step (sloth's auto checkpointing: until its
plan is settled, at most ``auto_max_steps``). A try fails on an out-of-memory error, or when the
allocator reserved more than the budget anyway. Between tries everything the step made is freed
(Unsloth's offloading buffers reset) and the peak counters restarted.
"""
from __future__ import annotations

import gc
import re
import time
from typing import Callable, List

GiB = 2 ** 30
# out-of-memory raised as a plain RuntimeError: a library's own cudaMalloc, a cuBLAS workspace
_OOM_TEXT = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation", re.IGNORECASE)


def search_longest(try_seq: Callable[[int], bool], start: int, max_seq: int, resolution: int,
                   time_left: Callable[[], float]) -> dict:
    """Longest multiple of ``resolution`` up to ``max_seq`` for which ``try_seq`` is True, assuming
    every shorter one works too: doubling from ``start``, then bisection. No try starts once
    ``time_left()`` is <= 0."""
    max_seq = max(resolution, max_seq // resolution * resolution)
    seq = max(resolution, min(start, max_seq) // resolution * resolution)
    ok, fail, stopped = 0, None, None
    while True:
        if time_left() <= 0:
            stopped = "time budget"
            break
        if not try_seq(seq):
            fail = seq
            break
        ok = seq
        if seq >= max_seq:
            break
        seq = min(2 * seq, max_seq)
    while stopped is None and fail is not None and fail - ok > resolution:
        if time_left() <= 0:
            stopped = "time budget"
            break
        mid = (ok + fail) // 2 // resolution * resolution      # strictly between: both are multiples
        if try_seq(mid):
            ok = mid
        else:
            fail = mid
    return {"longest_ok": ok or None, "shortest_fail": fail, "max_seq": max_seq, "reached_max": ok == max_seq,
            "bracket": (fail - ok) if fail is not None else None, "stopped": stopped}


def cap_memory(device, budget_gib: float):
    import torch
    if device.type != "cuda" or not budget_gib:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget_gib * GiB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"budget_gib": budget_gib, "fraction": fraction, "device_total_gib": total / GiB}


def search(model, optimizer, spec: dict, p: dict, vocab: int, device, dtype, memory, cap, emit, seed: int,
           fake_oom_above: int = 0) -> dict:
    import torch
    cuda = device.type == "cuda"
    controller, reset_unsloth = None, None
    if spec["base"] == "unsloth":
        try:    # its offloaded checkpointing keeps global buffers and step state: each try starts afresh
            from unsloth_zoo.gradient_checkpointing import reset_unsloth_gradient_checkpointing_buffers as reset_unsloth
        except ImportError:
            pass
    elif spec.get("sloth") is not None:
        from sloth_plugins import get_checkpoint_controller
        controller = get_checkpoint_controller(model)
    auto = controller is not None and controller.auto
    use_autocast = dtype in (torch.bfloat16, torch.float16)
    tries: List[dict] = []

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def try_seq(seq: int) -> bool:
        ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed + seq)).to(device)
        loss, times, status, error, loss_value = None, [], "ok", None, None
        memory.mark()
        try:
            for _ in range(p["auto_max_steps"] if auto else 1):
                decisions = controller.decisions if controller is not None else None
                sync()
                t = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
                    loss = model(input_ids=ids, labels=ids).loss
                if fake_oom_above and seq > fake_oom_above:       # --smoke: the OOM path on CPU
                    raise torch.cuda.OutOfMemoryError(f"simulated out of memory above {fake_oom_above} tokens")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                times.append(time.perf_counter() - t)
                loss_value, loss = float(loss.detach().float()), None
                if not auto or (controller.settled and controller.decisions == decisions):
                    break
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and not _OOM_TEXT.search(message):
                raise
            status, error = "oom", message
        # outside the except clause: its traceback, and the frames holding the step's tensors, are gone
        loss = ids = None
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        if reset_unsloth is not None:
            reset_unsloth()
        gc.collect()
        if cuda:
            sync()
            torch.cuda.empty_cache()
        peak, reserved = memory.window_peak(), memory.window_peak(reserved=True)
        if status == "ok" and cap is not None and reserved is not None and reserved > p["budget_gib"] * GiB:
            status, error = "over", f"no OOM, but {reserved / GiB:.2f} GiB reserved > {p['budget_gib']} GiB"
        row = {"seq": seq, "status": status, "step_s": times[-1] if times else None, "steps": len(times),
               "peak_gib": peak / GiB if peak is not None else None,
               "reserved_gib": reserved / GiB if reserved is not None else None, "loss": loss_value, "error": error}
        if controller is not None and getattr(controller, "plan", None) is not None:
            row["plan"] = controller.plan.summary()
        tries.append(row)
        emit("try", **row)
        return status == "ok"

    started = time.perf_counter()
    found = search_longest(try_seq, p["start_seq"], p["max_seq"], p["resolution"],
                           lambda: p["search_budget_s"] - (time.perf_counter() - started))
    best = next((t for t in tries if t["seq"] == found["longest_ok"] and t["status"] == "ok"), None)
    ok_tries = [t for t in tries if t["status"] == "ok"]
    return {**found, "search_s": time.perf_counter() - started, "tries": tries,
            "peak_gib": best["peak_gib"] if best else None, "step_s_mean": best["step_s"] if best else None,
            "tok_s": best["seq"] / best["step_s"] if best and best["step_s"] else None,
            "real_tok_s": best["seq"] / best["step_s"] if best and best["step_s"] else None,
            "loss_step0": ok_tries[0]["loss"] if ok_tries else None,
            "loss_final": ok_tries[-1]["loss"] if ok_tries else None}
