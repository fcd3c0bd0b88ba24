"""The benchmark runner's --smoke scenarios (tiny model on CPU) run end to end and agree with the
references: kernels within 1e-4 of eager, sloth's patched model trains with the same per-step
losses as plain HF + PEFT (fp32, same weights, data and LoRA init), a failing implementation is
recorded with its error, cells already in the JSON are kept, and the plot is written."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _start(script: str, *args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(BENCH / script), "--smoke", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(proc: subprocess.Popen, timeout: float = 300, rc: int = 0) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args[1]} --smoke timed out:\n{out[-4000:]}")
    assert proc.returncode == rc, f"{proc.args[1]} --smoke exited {proc.returncode}:\n{out[-4000:]}"
    return out


def _close(a, b):
    return all(math.isfinite(x) and math.isfinite(y) and abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b))


@pytest.mark.slow
def test_kernels_and_runner_smoke(tmp_path):
    # both at once: each is mostly process start-up and imports
    kernels = _start("kernels.py", "--out-dir", str(tmp_path / "k"))
    # attention="sloth": on CPU the packed row goes through sloth's per-sample reference attention
    env = {**os.environ, "SLOTH_BENCH_CONFIG": json.dumps({"attention": "sloth"})}
    common = ["--out-dir", str(tmp_path / "r"), "--model-cache", str(tmp_path / "models"), "--name", "smoke"]
    run = _start("run.py", "--scenario", "e2e-1b,padding-free-1b", "--impls", "hf_peft,sloth,sloth_packed,broken",
                 "--define", 'broken={"sloth": {"no_such_option": 1}}', "--host-profile", *common, env=env)
    kernels_out, out = _finish(kernels), _finish(run, rc=1)       # rc 1: "broken" failed

    rows = json.loads((tmp_path / "k" / "kernels.json").read_text())["rows"]
    measured = {(r["kernel"], r["impl"]): r for r in rows}
    for kernel in ("rms_norm", "rms_norm_dw", "rope", "swiglu", "geglu", "geglu_tanh", "fused_ce"):
        for impl in ("sloth", "eager", "compile"):
            row = measured.get((kernel, impl))
            assert row is not None and "error" not in row, (kernel, impl, row, kernels_out[-3000:])
            assert row["rel_err"] <= 1e-4, (kernel, impl, row["rel_err"])
    assert "rel err" in kernels_out

    payload = json.loads((tmp_path / "r" / "smoke.json").read_text())
    cells = {(r["scenario"], r["impl"]): r for r in payload["rows"]}
    assert set(cells) == {(s, i) for s in ("e2e-1b", "padding-free-1b") for i in ("hf_peft", "sloth", "sloth_packed",
                                                                                 "broken")}, out[-3000:]
    for scenario in ("e2e-1b", "padding-free-1b"):
        hf, ours, packed, broken = (cells[(scenario, i)] for i in ("hf_peft", "sloth", "sloth_packed", "broken"))
        assert hf["ok"] and ours["ok"] and packed["ok"], out[-3000:]
        for r in (hf, ours, packed):        # the schema
            assert r["tok_s"] > 0 and r["real_tok_s"] > 0 and r["mfu"] > 0 and r["n_matmul"] > 0
            assert "peak_gib" in r and math.isfinite(r["loss_step0"]) and math.isfinite(r["loss_final"])
            assert len(r["losses"]) == 3
        assert _close(hf["losses"], ours["losses"]) and _close(hf["losses"], packed["losses"]), (hf, ours, packed)
        assert ours["patch_report"]["loss"]["patched"] >= 1
        assert not broken["ok"] and "no_such_option" in broken["error"] and broken["tail"]
        host = ours["host_profile"]
        assert host["steps"] == 3 and host["python_calls_per_step"] > 0, host
    e2e_hf, pf_hf = cells[("e2e-1b", "hf_peft")], cells[("padding-free-1b", "hf_peft")]
    assert e2e_hf["tok_s"] == e2e_hf["real_tok_s"] and e2e_hf["batches_per_step"] == [1, 1, 1]
    pf_packed = cells[("padding-free-1b", "sloth_packed")]
    expected = payload["scenarios"]["padding-free-1b"]["dataset"]["real_tokens_per_step"]
    assert pf_hf["real_tokens_per_step"] == pf_packed["real_tokens_per_step"] == expected
    assert pf_hf["label_tokens_per_step"] == pf_packed["label_tokens_per_step"]
    assert pf_packed["padding_frac"] == 0 < pf_hf["padding_frac"] and min(pf_hf["batches_per_step"]) >= 2
    assert pf_packed["sloth_config"] == {"padding_free": True, "attention": "sloth"}
    assert "step-0 loss minus hf_peft's" in out and "same samples for every impl: yes" in out
    assert "host profile sloth" in out
    assert (tmp_path / "r" / "smoke.png").stat().st_size > 0

    # resumable: every cell is in the JSON, nothing runs again
    again = _finish(_start("run.py", "--scenario", "e2e-1b", "--impls", "hf_peft,sloth", *common), timeout=120)
    assert again.count("already (ok)") == 2 and "starting" not in again


@pytest.mark.slow
def test_trl_dpo_and_grpo_scenarios_smoke(tmp_path):
    """dpo-8b and grpo-1b on the tiny model: TRL's trainers alone and with SlothCallback run, with the same
    losses (fp32), TRL named as the loss's owner, and GRPO's generation timed apart from the rest."""
    common = ["--out-dir", str(tmp_path / "r"), "--model-cache", str(tmp_path / "models"), "--name", "rl"]
    out = _finish(_start("run.py", "--scenario", "dpo-8b,grpo-1b", "--impls", "trl,trl_sloth_offload", *common),
                  timeout=600)
    cells = {(r["scenario"], r["impl"]): r for r in json.loads((tmp_path / "r" / "rl.json").read_text())["rows"]}
    for scenario, trainer in (("dpo-8b", "DPOTrainer"), ("grpo-1b", "GRPOTrainer")):
        trl, ours = cells[(scenario, "trl")], cells[(scenario, "trl_sloth_offload")]
        assert trl["ok"] and ours["ok"], out[-3000:]
        assert trl["tok_s"] > 0 and len(trl["losses"]) == len(ours["losses"]) == 3
        assert ours["losses"] == pytest.approx(trl["losses"], rel=1e-4, abs=1e-6)
        assert any(f"TRL {trainer}" in n for n in ours["patch_notes"]), ours["patch_notes"]
        assert ours["sloth_config"]["gradient_checkpointing"] == "offload"
    grpo = cells[("grpo-1b", "trl")]
    assert len(grpo["generate_s"]) == 3 and all(0 < g < t for g, t in zip(grpo["generate_s"], grpo["step_s"]))
    assert grpo["train_s_mean"] > 0


@pytest.mark.slow
def test_vision_language_scenarios_smoke(tmp_path):
    """vl-gemma3-4b and vl-qwen2.5-vl-7b on the tiny VL models: a row per implementation, with tokens/s and
    peak memory for those that ran (sloth's per-step losses those of HF + PEFT), the CUDA-only ones recorded
    as skipped with the reason, and one that cannot take image batches (packed) recorded as failed."""
    common = ["--out-dir", str(tmp_path / "r"), "--model-cache", str(tmp_path / "models"), "--name", "vl"]
    impls = ["hf_peft", "sloth", "liger", "unsloth", "hf_peft_packed"]
    out = _finish(_start("run.py", "--scenario", "vl-gemma3-4b,vl-qwen2.5-vl-7b", "--impls", ",".join(impls), *common),
                  timeout=240, rc=1)                       # rc 1: hf_peft_packed failed
    payload = json.loads((tmp_path / "r" / "vl.json").read_text())
    cells = {(r["scenario"], r["impl"]): r for r in payload["rows"]}
    scenarios = {"vl-gemma3-4b": "tiny-gemma3-vl", "vl-qwen2.5-vl-7b": "tiny-qwen2.5-vl"}
    assert set(cells) == {(s, i) for s in scenarios for i in impls}, out[-3000:]
    for scenario, model in scenarios.items():
        assert payload["scenarios"][scenario]["model"]["model"] == model
        hf, ours = cells[(scenario, "hf_peft")], cells[(scenario, "sloth")]
        assert hf["ok"] and ours["ok"], out[-3000:]
        for r in (hf, ours):
            assert r["tok_s"] > 0 and "peak_gib" in r and len(r["losses"]) == 3 and r["n_matmul"] > 0
            assert r["tokens_per_step"] == [2 * (3 + 4 + 8)] * 3            # bos, markers, 4 image + 8 text tokens
            assert r["label_tokens_per_step"] == [2 * 8] * 3                # image tokens and markers not labelled
        assert _close(hf["losses"], ours["losses"]), (hf["losses"], ours["losses"])
        assert hf["fingerprint"] == ours["fingerprint"]
        assert ours["patch_report"]["loss"]["patched"] >= 1 and ours["patch_report"]["lora_qkv"]["patched"] >= 1
        for impl in ("liger", "unsloth"):
            assert not cells[(scenario, impl)]["ok"] and "CUDA GPU" in cells[(scenario, impl)]["skipped"]
        packed = cells[(scenario, "hf_peft_packed")]
        assert not packed["ok"] and "padded layout only" in packed["error"], packed
    assert (tmp_path / "r" / "vl.png").stat().st_size > 0


@pytest.mark.slow
def test_moe_scenario_and_fp16_matrix_row_smoke(tmp_path):
    """moe-qwen3-30b-a3b on the tiny Qwen3-MoE: LoRA on attention and on the experts' 3-D weights for both
    implementations, sloth's grouped-GEMM experts with the expert LoRA fused, the same per-step losses.
    An fp16 matrix row: the model in fp16, fp32 LoRA weights, fp16 autocast and a GradScaler, whose skipped
    steps are sloth's too (they were not: the fused loss's fp16 gradient overflowed at the scaler's 65536)."""
    moe = _start("run.py", "--scenario", "moe-qwen3-30b-a3b", "--impls", "hf_peft,sloth", "--out-dir",
                 str(tmp_path / "r"), "--model-cache", str(tmp_path / "models"), "--name", "moe")
    fp16 = _start("run.py", "--families", "llama-3.2-1b", "--modes", "fp16", "--impls", "hf_peft,sloth",
                  "--out-dir", str(tmp_path / "r"), "--model-cache", str(tmp_path / "models16"), "--name", "fp16")
    out, out16 = _finish(moe), _finish(fp16)
    cells = {r["impl"]: r for r in json.loads((tmp_path / "r" / "moe.json").read_text())["rows"]}
    hf, ours = cells["hf_peft"], cells["sloth"]
    assert hf["ok"] and ours["ok"], out[-3000:]
    assert len(hf["losses"]) == 3 and _close(hf["losses"], ours["losses"]), (hf["losses"], ours["losses"])
    assert hf["trainable_params"] == ours["trainable_params"]
    experts = ours["patch_report"]["moe_experts"]
    assert experts["patched"] == 2 and experts["fallback"] == 0 and "LoRA on down_proj/gate_up_proj fused" in experts["how"][0]

    cells = {r["impl"]: r for r in json.loads((tmp_path / "r" / "fp16.json").read_text())["rows"]}
    hf, ours = cells["hf_peft"], cells["sloth"]
    assert hf["ok"] and ours["ok"], out16[-3000:]
    for r in (hf, ours):
        assert r["scenario"] == "llama-3.2-1b-fp16" and r["dtype"] == "fp16" and r["lora_param_dtype"] == "torch.float32"
        assert r["autocast"] and r["scaler_final_scale"] > 0
    assert ours["scaler_skipped_steps"] == hf["scaler_skipped_steps"], (hf, ours)
    assert all(abs(a - b) <= 3e-3 * abs(b) for a, b in zip(ours["losses"], hf["losses"])), (hf["losses"], ours["losses"])


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_zero3_offload_scenario_smoke(tmp_path):
    """zero3-offload-8b on the tiny model: the HF Trainer under ZeRO-3 with CPU offload (DeepSpeed's CPU
    accelerator here), alone and with SlothCallback: the same per-step losses, sloth's fused loss and LoRA
    ran, and the budgeted row is skipped without a measured peak (CPU)."""
    common = ["--out-dir", str(tmp_path / "r"), "--model-cache", str(tmp_path / "models"), "--name", "ds"]
    out = _finish(_start("run.py", "--scenario", "zero3-offload-8b", *common), timeout=300)
    cells = {r["impl"]: r for r in json.loads((tmp_path / "r" / "ds.json").read_text())["rows"]}
    plain, ours = cells["ds"], cells["ds_sloth"]
    assert plain["ok"] and ours["ok"], out[-3000:]
    assert plain["deepspeed"]["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert len(plain["losses"]) == 3 and _close(plain["losses"], ours["losses"]), (plain["losses"], ours["losses"])
    report = ours["patch_report"]
    assert report["loss"]["patched"] == 1 and report["lora_mlp"]["patched"] >= 1 and report["lora_mlp"]["fallback"] == 0
    assert not cells["ds_sloth_at_ds_peak"]["ok"] and "measured peak" in cells["ds_sloth_at_ds_peak"]["skipped"]
