"""The benchmark scripts' --smoke modes (tiny shapes on CPU) run end to end and agree with
the references: kernels within 1e-4 of eager, and sloth's patched model trains with the
same per-step losses as plain HF + PEFT (fp32, same weights, data and LoRA init)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(BENCH / script), "--smoke", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args[1]} --smoke timed out:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{proc.args[1]} --smoke exited {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.mark.slow
def test_kernel_and_e2e_smoke_modes(tmp_path):
    # both at once: each is mostly process start-up and imports
    kernels = _start("kernels.py", "--out-dir", str(tmp_path / "k"))
    e2e = _start("e2e.py", "--out-dir", str(tmp_path / "e"), "--model-dir", str(tmp_path / "model"), "--host-profile")
    kernels_out, e2e_out = _finish(kernels), _finish(e2e)

    rows = json.loads((tmp_path / "k" / "kernels.json").read_text())["rows"]
    measured = {(r["kernel"], r["impl"]): r for r in rows}
    for kernel in ("rms_norm", "rms_norm_dw", "rope", "swiglu", "geglu", "geglu_tanh", "fused_ce"):
        for impl in ("sloth", "eager", "compile"):
            row = measured.get((kernel, impl))
            assert row is not None and "error" not in row, (kernel, impl, row, kernels_out[-3000:])
            assert row["rel_err"] <= 1e-4, (kernel, impl, row["rel_err"])
            assert all(row[f"{m}_ms"] > 0 for m in ("fwd", "bwd", "fwdbwd"))
    assert measured[("fused_ce", "torch_chunked")]["rel_err"] <= 1e-4
    assert "rel err" in kernels_out and "fused_ce" in kernels_out

    payload = json.loads((tmp_path / "e" / "e2e_tiny_fp32_gc.json").read_text())
    results = {r["impl"]: r for r in payload["results"]}
    assert set(results) == {"hf_peft", "sloth"}, e2e_out[-3000:]
    hf, ours = results["hf_peft"], results["sloth"]
    assert hf["ok"] and ours["ok"], e2e_out[-3000:]
    assert len(hf["losses"]) == len(ours["losses"]) >= 2
    for a, b in zip(hf["losses"], ours["losses"]):
        assert math.isfinite(a) and math.isfinite(b)
        assert abs(a - b) <= 1e-4 * abs(a), (hf["losses"], ours["losses"])
    assert ours["patch_report"].get("loss", {}).get("patched", 0) >= 1
    assert hf["tok_s"] > 0 and ours["tok_s"] > 0 and hf["n_matmul"] > 0
    assert "step-0 loss" in e2e_out and "N_matmul" in e2e_out
    host = ours["host_profile"]
    assert host["steps"] == 3 and host["python_calls_per_step"] > 0, host
    step = next(r for r in host["by_cumulative_time"] if r["function"].endswith("(step)"))
    assert step["calls_per_step"] == 1 and 0 < step["cum_ms_per_step"] <= host["profiled_step_ms"], host
    assert "host profile sloth" in e2e_out


@pytest.mark.slow
def test_padding_free_smoke_mode(tmp_path):
    # attention="sloth": on CPU the packed row goes through sloth's per-sample reference attention
    # (with "auto" it would be transformers' SDPA); a sample seeing its neighbours moves the loss ~2e-3
    env = {**os.environ, "SLOTH_BENCH_CONFIG": json.dumps({"attention": "sloth"})}
    proc = subprocess.Popen([sys.executable, str(BENCH / "padding_free.py"), "--smoke",
                             "--out-dir", str(tmp_path / "pf"), "--model-dir", str(tmp_path / "model")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = _finish(proc)

    payload = json.loads((tmp_path / "pf" / "padding_free_tiny.json").read_text())
    results = {r["impl"]: r for r in payload["results"]}
    assert set(results) == {"hf_peft", "sloth", "sloth_padded"}, out[-3000:]
    assert all(r["ok"] for r in results.values()), out[-3000:]
    hf, packed, padded = results["hf_peft"], results["sloth"], results["sloth_padded"]
    assert (hf["layout"], packed["layout"], padded["layout"]) == ("padded", "packed", "padded")
    # real tokens: attention-mask sums (padded) and row lengths (packed) both equal the dataset's
    expected = payload["dataset"]["real_tokens_per_step"]
    assert len(expected) == 3 and hf["real_tokens_per_step"] == packed["real_tokens_per_step"] == expected
    assert padded["real_tokens_per_step"] == expected
    assert hf["label_tokens_per_step"] == packed["label_tokens_per_step"] == padded["label_tokens_per_step"]
    assert packed["padding_frac"] == 0 < hf["padding_frac"] == padded["padding_frac"]
    assert set(packed["batches_per_step"]) == {1} and min(hf["batches_per_step"]) >= 2   # accumulation exercised
    assert packed["sloth_config"] == {"padding_free": True, "attention": "sloth"}
    assert packed["patch_report"]["attention"]["patched"] == 1 and packed["patch_report"]["loss"]["patched"] == 1
    for ours in (packed, padded):
        assert len(ours["losses"]) == len(hf["losses"]) == 3
        for a, b in zip(hf["losses"], ours["losses"]):
            assert math.isfinite(a) and math.isfinite(b)
            assert abs(a - b) <= 1e-4 * abs(a), (ours["impl"], hf["losses"], ours["losses"])
    assert hf["real_tok_s"] > 0 and packed["real_tok_s"] > 0
    assert "step-0 loss minus hf_peft's" in out and "same samples for every impl: yes" in out
