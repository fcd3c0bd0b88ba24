"""Benchmark tooling on CPU: run.py --profile and the longest-sequence search, the kernel
categories of the profile, the peak-memory meters that must survive other code's
torch.cuda.reset_peak_memory_stats (slothbench.meter.PeakMemory, axolotl_h200.sh's bench_meter),
the shapes table, the Pareto front, and gpu_suite.sh's phases naming runner scenarios."""
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slothbench(name: str):
    sys.path.insert(0, str(BENCH))    # for `import _common` (it registers slothbench, then leaves the path)
    try:
        import _common  # noqa: F401
        return importlib.import_module(f"slothbench.{name}")
    finally:
        sys.path[:] = [p for p in sys.path if p != str(BENCH)]


@pytest.fixture(scope="module")
def worker():
    """The profile summaries and the meter, as one namespace (they were e2e_worker's)."""
    prof, meter = _slothbench("profile"), _slothbench("meter")
    return types.SimpleNamespace(**vars(prof), PeakMemory=meter.PeakMemory)


@pytest.fixture(scope="module")
def longest():
    search, models = _slothbench("longest"), _slothbench("models")
    return types.SimpleNamespace(search_longest=search.search_longest, long_context_view=models.long_context_view)


def _run(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, f"run.py --smoke exited {proc.returncode}:\n{proc.stdout[-4000:]}"
    return proc.stdout


# ----------------------------------------------------------------------------------- categories

@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(...)", "matmul"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "attention"),
    ("_fwd_kernel", "attention"), ("_dkdv_kernel", "attention"), ("_dq_kernel", "attention"),
    ("_rms_norm_fwd_kernel", "rms_norm"), ("_rms_norm_bwd_dw_kernel", "rms_norm"),
    ("_rms_layernorm_backward", "rms_norm"),
    ("_rope_kernel", "rope"), ("_gated_fwd_kernel", "swiglu/geglu"), ("_gated_bwd_kernel", "swiglu/geglu"),
    ("_swiglu_forward_kernel", "swiglu/geglu"), ("_DWf_DW_dfg_kernel", "swiglu/geglu"),
    ("_gated_bwd_inplace_kernel", "lora (fused)"), ("_cross_entropy_rows_kernel", "cross_entropy"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>",
     "cross_entropy"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, int)", "bnb dequant"),
    ("_dequant_4bit_kernel", "nf4 dequant (triton)"),
    ("Memcpy HtoD (Pinned -> Device)", "memcpy HtoD"), ("Memcpy DtoH (Device -> Pinned)", "memcpy DtoH"),
    ("Memcpy DtoD (Device -> Device)", "elementwise/copy"), ("Memset (Device)", "elementwise/copy"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...FusedAdamMathFunctor...>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float, ...>>",
     "elementwise/copy"),
    ("triton_poi_fused_add_mul_0", "elementwise/copy"),
    ("aten::mm", "matmul"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_foreach_mul_", "optimizer"), ("aten::mul", "elementwise/copy"),
    ("some_unknown_kernel", "other"),
])
def test_profile_categories(worker, name, category):
    assert worker.categorize(name) == category


def test_summarize_profile_per_step_shares_and_busy_union(worker):
    # two steps; a copy on a side stream overlaps a gemm: busy time counts the overlap once
    records = [("sm90_xmma_gemm_x", 300.0, 0.0, 300.0), ("Memcpy HtoD (Pinned -> Device)", 100.0, 250.0, 350.0),
               ("_rms_norm_fwd_kernel", 50.0, 400.0, 450.0),
               ("sm90_xmma_gemm_x", 300.0, 1000.0, 1300.0), ("_rms_norm_fwd_kernel", 150.0, 1300.0, 1450.0)]
    out = worker.summarize_profile(records, n_steps=2, step_s=0.001, source="test")
    cats = {c["category"]: c for c in out["categories"]}
    assert cats["matmul"]["ms_per_step"] == pytest.approx(0.3)
    assert cats["matmul"]["pct_of_step"] == pytest.approx(30.0)
    assert cats["memcpy HtoD"]["ms_per_step"] == pytest.approx(0.05)
    assert cats["rms_norm"]["ms_per_step"] == pytest.approx(0.1)
    assert [c["category"] for c in out["categories"]] == ["matmul", "rms_norm", "memcpy HtoD"]
    assert out["total"]["ms_per_step"] == pytest.approx(0.45)
    assert out["device_busy"]["ms_per_step"] == pytest.approx(0.425)      # (350 + 50 + 450) / 2 us
    assert out["device_idle"]["ms_per_step"] == pytest.approx(1.0 - 0.425)
    top = out["top_kernels"][0]
    assert top["name"] == "sm90_xmma_gemm_x" and top["calls_per_step"] == 1.0 and top["category"] == "matmul"


# ------------------------------------------------------------------------------- peak meters

class FakeAllocator:
    """max_memory_allocated / reset_peak_memory_stats as the CUDA caching allocator keeps them."""

    def __init__(self):
        self.now = self.peak = 0
        self.resets = 0

    def alloc(self, n):
        self.now += n
        self.peak = max(self.peak, self.now)

    def free(self, n):
        self.now -= n

    def max_allocated(self, device=None):
        return self.peak

    def reset(self, device=None):
        self.resets += 1
        self.peak = self.now


@pytest.fixture
def fake_cuda(monkeypatch):
    # imported while CUDA still reads as absent (bitsandbytes, via transformers, probes it on import)
    import transformers.trainer_callback  # noqa: F401
    fake = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", fake.max_allocated)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "fake GPU")
    # both names: the meters replace them, monkeypatch puts the originals back afterwards
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset)
    monkeypatch.setattr(torch.cuda.memory, "reset_peak_memory_stats", fake.reset)
    return fake


def test_peak_memory_survives_resets_by_others(worker, fake_cuda):
    fake_cuda.alloc(100)                          # the weights
    meter = worker.PeakMemory(torch.device("cuda", 0))
    fake_cuda.alloc(900)                          # loading leftovers: not part of the run
    fake_cuda.free(900)
    meter.start()
    fake_cuda.alloc(500)                          # a measuring step's forward...
    fake_cuda.free(500)
    torch.cuda.reset_peak_memory_stats()          # ...then sloth's auto resets the counter
    fake_cuda.alloc(200)
    fake_cuda.free(200)
    assert fake_cuda.max_allocated() == 300       # what a plain reading would report
    meter.mark()                                  # the timed steps
    fake_cuda.alloc(300)
    torch.cuda.memory.reset_peak_memory_stats()
    fake_cuda.free(300)
    assert meter.peak() == 600
    assert meter.window_peak() == 400
    assert meter.resets_by_others == 2


def test_peak_memory_is_none_without_cuda(worker):
    meter = worker.PeakMemory(torch.device("cpu"))
    meter.start()
    meter.mark()
    assert meter.peak() is None and meter.window_peak() is None and meter.resets_by_others == 0


def _bench_meter_source() -> str:
    script = (BENCH / "axolotl_h200.sh").read_text()
    start = script.index("cat > \"$WORK/bench_meter.py\" <<'PY'\n") + len("cat > \"$WORK/bench_meter.py\" <<'PY'\n")
    return script[start:script.index("\nPY\n", start) + 1]


def test_axolotl_meter_reports_the_true_peak_despite_axolotls_log_resets(fake_cuda, monkeypatch, tmp_path):
    base = types.ModuleType("axolotl.integrations.base")
    base.BasePlugin = type("BasePlugin", (), {})
    for name in ("axolotl", "axolotl.integrations"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "axolotl.integrations.base", base)
    path = tmp_path / "bench_meter.py"
    path.write_text(_bench_meter_source())
    meter_module = _module("bench_meter_under_test", path)
    out = tmp_path / "rows.jsonl"
    monkeypatch.setenv("BENCH_OUT", str(out))
    monkeypatch.setenv("BENCH_WARMUP", "1")
    monkeypatch.setenv("RANK", "0")
    cfg = types.SimpleNamespace(micro_batch_size=2, gradient_accumulation_steps=1, sequence_len=64,
                                base_model="/m/tiny", gradient_checkpointing=True)
    state = types.SimpleNamespace(log_history=[])
    meter = meter_module.MeterPlugin().add_callbacks_post_trainer(cfg, None)[0]

    def axolotl_log(loss):   # AxolotlTrainer.log: reads the peak since the last log, then resets it
        state.log_history.append({"loss": loss, "memory/max_allocated (GiB)": fake_cuda.max_allocated() / 2**30})
        torch.cuda.reset_peak_memory_stats(0)

    fake_cuda.alloc(2 * 2**30)                        # weights + optimizer state
    meter.on_train_begin(None, state, None)
    for activations in (6, 9, 8):                     # GiB per step
        meter.on_step_begin(None, state, None)
        fake_cuda.alloc(activations * 2**30)
        fake_cuda.free(activations * 2**30)
        meter.on_step_end(None, state, None)
        axolotl_log(1.0)
    axolotl_log(1.0)                                  # the final metrics log, just before on_train_end
    assert fake_cuda.max_allocated() == 2 * 2**30     # what the old meter read: the weights alone
    meter.on_train_end(None, state, None, model=None)

    row = json.loads(out.read_text().splitlines()[0])
    assert row["peak_mem_gib"] == 11.0
    assert row["step_peaks_gib"] == [8.0, 11.0, 10.0]
    assert row["peak_mem_steady_gib"] == 11.0
    assert row["axolotl_logged_max_gib"] == 11.0
    assert row["peak_resets_by_others"] == 4


# ------------------------------------------------------------------------------------- search

@pytest.mark.parametrize("threshold, start, expect_ok, expect_fail", [
    (45 * 1024, 8192, 45 * 1024, 46 * 1024),    # doubling to 64k, then bisection to 1k
    (10**9, 8192, 131072, None),                 # everything trains: stops at max
    (5_000, 8192, 4 * 1024, 5 * 1024),           # the first try fails: bisection below it
    (500, 8192, None, 1024),                     # nothing trains
    (100_000, 100_000, 97 * 1024, 98 * 1024),   # a start that is no multiple: rounded down
])
def test_search_longest(longest, threshold, start, expect_ok, expect_fail):
    tried = []

    def try_seq(seq):
        assert seq % 1024 == 0 and 1024 <= seq <= 131072 and seq not in tried
        tried.append(seq)
        return seq <= threshold

    out = longest.search_longest(try_seq, start, 131072, 1024, lambda: 1.0)
    assert out["longest_ok"] == expect_ok
    assert out["shortest_fail"] == expect_fail
    assert out["stopped"] is None
    if expect_fail is not None and expect_ok is not None:
        assert out["bracket"] == 1024
    assert len(tried) <= 12


def test_search_longest_stops_on_time_budget(longest):
    budget = iter([1.0, 1.0, 0.0])
    out = longest.search_longest(lambda seq: True, 8192, 131072, 1024, lambda: next(budget))
    assert out == dict(longest_ok=16384, shortest_fail=None, max_seq=131072, reached_max=False, bracket=None,
                       stopped="time budget")


def test_long_context_view_links_weights_and_raises_max_positions(longest, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"max_position_embeddings": 8192, "vocab_size": 7}))
    (src / "model.safetensors").write_bytes(b"weights")
    view = longest.long_context_view(src, 131072)
    assert view != src and (view / "model.safetensors").is_symlink()
    assert (view / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((view / "config.json").read_text()) == {"max_position_embeddings": 131072, "vocab_size": 7}
    assert longest.long_context_view(src, 4096) == src


# ------------------------------------------------------------------------ shapes, plot, suite

def test_shapes_cover_every_family_at_public_shapes():
    models, scenarios = _slothbench("models"), _slothbench("scenarios")
    assert set(models.FAMILIES) == {"llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b-v0.3", "qwen2.5-7b",
                                    "qwen3-8b", "gemma-2-9b", "gemma-3-4b", "phi-3-mini"}
    params = {}
    for name in models.FAMILIES:
        cfg = models.build_config(name).to_dict()
        params[name] = models.matmul_flops(cfg)["n_matmul"] / 1e9
    assert 7.4 < params["llama-3.1-8b"] < 7.6 and 1.1 < params["llama-3.2-1b"] < 1.3      # lm_head counted
    assert 7.0 < params["mistral-7b-v0.3"] < 7.3 and 7.0 < params["qwen2.5-7b"] < 7.2
    assert 7.5 < params["qwen3-8b"] < 7.65 and 3.6 < params["phi-3-mini"] < 3.9
    grid = scenarios.matrix(["all"], ["bf16", "qlora"])
    assert len(grid) == 2 * len(models.FAMILIES)
    assert {json.dumps(s["data"]) for s in grid} == {json.dumps(grid[0]["data"])}     # every shape alike
    assert models.lora_targets("phi3") != models.lora_targets("llama")
    # vision-language shapes: the language model's linear layers (the vision tower not counted), not in the matrix
    vl = {name: models.matmul_flops(models.build_config(name).to_dict())["n_matmul"] / 1e9 for name in models.VISION}
    assert 3.8 < vl["gemma-3-4b-vl"] < 3.95 and 7.0 < vl["qwen2.5-vl-7b"] < 7.15, vl
    assert vl["tiny-gemma3-vl"] < 1e-3 and not set(models.VISION) & set(models.FAMILIES)
    assert models.smoke_shape("qwen2.5-vl-7b") == "tiny-qwen2.5-vl" and models.smoke_shape("qwen3-8b") == "tiny"
    # MoE: the active parameters a token runs through (top-8 of 128 experts, router, attention, head), not the 30 B
    cfg = models.build_config("qwen3-30b-a3b")
    assert 2.95 < models.matmul_flops(cfg.to_dict())["n_matmul"] / 1e9 < 3.1 and models.MOE == ["qwen3-30b-a3b"]
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        total = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters()) / 1e9
    assert 30.4 < total < 30.6, total
    assert not set(models.MOE) & set(models.FAMILIES) and models.smoke_shape("qwen3-30b-a3b") == "tiny-qwen3-moe"
    assert models.lora_parameters("qwen3_moe") and models.lora_parameters("llama") is None


def test_make_room_deletes_only_this_benchmarks_models_least_recently_used_first(tmp_path, monkeypatch):
    models = _slothbench("models")
    cache = tmp_path / "models"
    for i, name in enumerate(["old", "new"]):
        (cache / name).mkdir(parents=True)
        (cache / name / "bench_meta.json").write_text("{}")
        os.utime(cache / name / "bench_meta.json", (1000 + i, 1000 + i))
    (cache / "old-maxpos131072").mkdir()            # its long-context view goes with it
    (cache / "mine").mkdir()                        # not made by the benchmark: never deleted
    free = {"gib": 10}
    sizes = {"old": 20, "new": 30}

    def usage(path):
        gone = sum(n for name, n in sizes.items() if not (cache / name).exists())
        return shutil._ntuple_diskusage(100 << 30, 0, (free["gib"] + gone) << 30)

    monkeypatch.setattr(models.shutil, "disk_usage", usage)
    assert models.make_room(cache, 25 << 30) == ["old"]
    assert not (cache / "old-maxpos131072").exists() and (cache / "new").exists() and (cache / "mine").exists()
    assert models.make_room(cache, 25 << 30) == []
    with pytest.raises(SystemExit, match="not enough disk"):
        models.make_room(cache, 90 << 30)
    assert (cache / "mine").exists() and not (cache / "new").exists()


def test_pareto_front():
    plot = _slothbench("plot")
    points = [(10.0, 100.0, "a"), (12.0, 90.0, "b"), (8.0, 50.0, "c"), (20.0, 150.0, "d"), (10.0, 100.0, "e")]
    assert [p[2] for p in plot.pareto(points)] == ["c", "a", "e", "d"]


def test_gpu_suite_phases_are_runner_scenarios():
    scenarios = _slothbench("scenarios")
    script = (BENCH / "gpu_suite.sh").read_text()
    subprocess.run(["bash", "-n", str(BENCH / "gpu_suite.sh")], check=True)
    cases = script[script.index("  case $phase in"):script.index("    *) echo")]
    named = set(scenarios.NAMED)
    listed = set(re.findall(r"^#   ([a-z0-9.-]+)\s", script, re.M)) - {"tests", "tests-kernels", "tests-rest", "kernels", "attention", "matrix", "bash"}
    assert listed and listed <= named, listed - named
    assert all(re.search(rf"(^|[|\s]){re.escape(p)}[|)]", cases, re.M) for p in listed), cases
    assert "e2e-8b-offload" in listed and "e2e-8b-qlora-offload" in listed and "vl-qwen2.5-vl-7b" in listed


# ----------------------------------------------------------------------------- smoke runs

@pytest.mark.slow
def test_runner_smoke_with_profile(tmp_path):
    out = _run("--scenario", "e2e-1b", "--profile", "--impls", "sloth", "--out-dir", str(tmp_path / "e"),
               "--model-cache", str(tmp_path / "models"))
    result = json.loads((tmp_path / "e" / "e2e-1b.json").read_text())["rows"][0]
    assert result["ok"] and result["impl"] == "sloth", out[-3000:]
    prof = result["profile"]
    assert "error" not in prof, prof
    assert prof["steps"] == 2 and prof["source"] == "CPU ops, self time" and prof["events"] > 100
    cats = {c["category"]: c["ms_per_step"] for c in prof["categories"]}
    assert cats.get("matmul", 0) > 0 and cats.get("lora (fused)", 0) > 0, cats
    assert 0 < prof["total"]["ms_per_step"] <= 1.5 * prof["profiled_step_ms"]
    assert 1 <= len(prof["top_kernels"]) <= 15
    assert "profile sloth:" in out and "top kernels" in out


@pytest.mark.slow
def test_longest_seq_smoke(tmp_path):
    out = _run("--scenario", "longest-8b", "--impls", "hf_peft,sloth_auto", "--out-dir", str(tmp_path / "l"),
               "--model-cache", str(tmp_path / "models"))
    payload = json.loads((tmp_path / "l" / "longest-8b.json").read_text())
    results = {r["impl"]: r for r in payload["rows"]}
    assert set(results) == {"hf_peft", "sloth_auto"}, out[-3000:]
    for r in results.values():
        assert r["ok"], r
        # 64, 128 train; 256 and 192 hit the simulated OOM; 160 trains: bracket 32
        assert [(t["seq"], t["status"]) for t in r["tries"]] == [(64, "ok"), (128, "ok"), (256, "oom"), (192, "oom"),
                                                                 (160, "ok")]
        assert r["longest_ok"] == 160 and r["shortest_fail"] == 192 and r["tok_s"] > 0
        assert all(t["loss"] > 0 for t in r["tries"] if t["status"] == "ok")
    assert results["sloth_auto"]["tries"][0]["steps"] >= 2        # auto: measures, then plans
    assert "longest ok" in out and payload["meta"]["versions"]["torch"]


def test_matrix_budget_comes_from_hf_peft_peak_of_the_same_scenario():
    S = _slothbench("scenarios")
    spec = {"base": "hf", "sloth": {"gradient_checkpointing": "auto"}, "budget_from": "hf_peft"}
    rows = [{"scenario": "a", "impl": "hf_peft", "ok": True, "peak_gib": 23.6049},
            {"scenario": "b", "impl": "hf_peft", "ok": True, "peak_gib": 9.0}]
    got, why = S.with_measured_budget(spec, rows, "a")
    assert why is None and got["sloth"] == {"gradient_checkpointing": "auto", "memory_budget_gb": 23.6}
    assert spec["sloth"] == {"gradient_checkpointing": "auto"}          # the definition is not changed
    for missing in ([], [{**rows[0], "ok": False}], [{**rows[0], "peak_gib": None}]):
        got, why = S.with_measured_budget(spec, missing, "a")
        assert got is None and "hf_peft's measured peak" in why
    plain = {"base": "hf", "sloth": {}}
    assert S.with_measured_budget(plain, [], "a") == (plain, None)
    impls = {s["name"]: s["impls"] for s in S.matrix(["mistral-7b-v0.3"], ["qlora"])}
    assert impls == {"mistral-7b-v0.3-qlora": ["hf_peft", "liger", "unsloth", "sloth_offload", "sloth",
                                               "sloth_at_hf_peak"]}
