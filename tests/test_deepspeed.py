"""DeepSpeed ZeRO under the adapters: the same DeepSpeed run with and without sloth.

ZeRO-3 partitions every parameter even at world size 1, so one process exercises the gathers:
the lm_head read by the fused loss (frozen: the loss runs as the head's forward; trainable: registered as an
external parameter of the CausalLM, so DeepSpeed gathers it for its forward and backward), and the
projections' weights read by the fused LoRA functions (registered with the module that runs them).
Each case trains the same tiny model on the same batches under DeepSpeed twice, without and with
sloth, and compares the per-step losses and gradient norms; spies count the fused calls, so a
silent fallback to the model's own code fails the test, and the PatchReport must say what ran.

On CPU DeepSpeed runs on its CPU accelerator (``DS_ACCELERATOR=cpu``) over gloo; nothing else is
needed (no oneCCL), and it builds its small shared-memory op with the machine's C++ compiler on
first use. The workers run in a subprocess (this file, ``python tests/test_deepspeed.py hf OUT``)
so that the process group DeepSpeed starts does not outlive them into other tests.

Lightning refuses its DeepSpeedStrategy off CUDA by type (``setup_environment``); the CPU test
lifts exactly that check, for the plain and the sloth strategy alike (DeepSpeed itself runs).
The ``-m gpu`` tests run the same comparisons on a CUDA device in bf16 with more steps.
Runtime on a free 2-core CPU: about 2 min of CPU for the file (three worker processes, one
torchrun pair); the Axolotl test (6 runs, about 2.5 min) runs in the Axolotl environment, where
tests/run.sh installs DeepSpeed.
"""
import os
import sys

if __name__ == "__main__":
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import collections  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB = 256
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rows(n, seed=0, low=10, high=33):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g)
    return [dict(input_ids=torch.randint(3, VOCAB, (int(k),), generator=g)) for k in lengths]


def _ds_config(stage, offload=False):
    zero, extra = {"stage": stage}, {}
    if stage == 3:
        # every parameter partitioned (none kept whole for being small), so every gather path runs
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
        if offload:
            zero.update(offload_param={"device": "cpu"}, offload_optimizer={"device": "cpu"})
            extra = {"zero_force_ds_cpu_optimizer": False}   # the torch AdamW, not DeepSpeedCPUAdam
    # no "optimizer": the Trainer's torch AdamW (DeepSpeed's fused optimizers need its compiled ops)
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"}, **extra}


# ---------------------------------------------------------------------------------------------
# Worker side (a subprocess)
# ---------------------------------------------------------------------------------------------

class Spy:
    """Counts the calls of sloth's fused functions (each call goes through unchanged)."""

    def __init__(self):
        from sloth_plugins.plugins import fused_lora, loss
        self.counts = collections.Counter()
        for module, names in ((fused_lora, ("lora_projections", "lora_gated_mlp")),
                              (loss, ("fused_linear_cross_entropy", "chunked_cross_entropy"))):
            for name in names:
                setattr(module, name, self._counted(name, getattr(module, name)))

    def _counted(self, name, fn):
        def call(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)
        return call


def _model(full_ft, gpu, size, tied=False, lora_head=False):
    from sloth_plugins.testing import tiny_model, with_lora
    # "1b": the Llama-3.2-1B shape (random init), for the GPU tests
    kw = dict(vocab_size=VOCAB) if size == "tiny" else dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64)
    model = tiny_model("llama", seed=0, tie_word_embeddings=tied, **kw)
    if not full_ft:
        torch.manual_seed(1)
        model = with_lora(model, target_modules=LORA_TARGETS + (["lm_head"] if lora_head else []))
    return model


def _hf_case(out, name, stage, use_sloth, full_ft=False, checkpointing=False, gpu=False, steps=4, size="tiny",
             offload=False, save=False, tied=False, lora_head=False, zero_init=False, sloth_options=None):
    from transformers import Trainer, TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import sloth_plugins as sloth
    from sloth_plugins.testing import MicroLossRecorder, right_pad_collate
    unset_hf_deepspeed_config()            # the previous case's: the model is built without zero.Init
    model = None if zero_init else _model(full_ft, gpu, size, tied, lora_head)
    args = TrainingArguments(
        output_dir=os.path.join(out, name), max_steps=steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=2e-3, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not gpu, bf16=gpu, deepspeed=_ds_config(stage, offload), seed=0, data_seed=0,
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=checkpointing, remove_unused_columns=False)
    if zero_init:   # built after the ZeRO-3 config exists: deepspeed.zero.Init partitions it as it is built
        model = _model(full_ft, gpu, size, tied, lora_head)
    callbacks = [sloth.SlothCallback(verbose=False, **(sloth_options or {}))] if use_sloth else []

    class T(MicroLossRecorder, Trainer):
        pass

    rows = _rows(steps * 4) if size == "tiny" else _rows(steps * 4, low=256, high=1025)
    trainer = T(model=model, args=args, train_dataset=rows, data_collator=right_pad_collate,
                callbacks=callbacks)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = dict(micro=trainer.micro_losses, grad_norm=[h["grad_norm"] for h in logs],
                  report=str(callbacks[0].report) if use_sloth else None,
                  notes=list(callbacks[0].report.notes) if use_sloth else None,
                  summary=callbacks[0].report.summary() if use_sloth else None)
    if save:
        trainer.save_model(os.path.join(out, name, "adapter"))
    if gpu:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
    return result


HF_CASES = {   # name: (stage, options)
    "z3_lora": (3, dict(save=True)),
    "z3_full": (3, dict(full_ft=True)),
    "z3_lora_ckpt": (3, dict(checkpointing=True)),
    # auto checkpointing with a budget: planned under ZeRO-3, with the caveat that its measure leaves out
    # the parameters DeepSpeed gathers (RESULTS 4.3)
    "z3_lora_auto": (3, dict(checkpointing=True, sloth_options=dict(gradient_checkpointing="auto",
                                                                    memory_budget_gb=1.0))),
    "z3_full_tied": (3, dict(full_ft=True, tied=True)),     # the trainable head is the embedding
    "z3_lora_tied": (3, dict(tied=True)),                   # a frozen head that the embedding shares
    "z3_lora_head": (3, dict(lora_head=True)),              # a LoRA head: the model's own loss, said so
    "z3_lora_zero_init": (3, dict(zero_init=True)),         # partitioned before sloth patches it
    "z3_lora_offload": (3, dict(offload=True)),             # offload_param + offload_optimizer (cpu)
    "z2_lora": (2, dict()),
    "z1_lora": (1, dict()),
}


def hf_worker(out, gpu=False):
    spy = Spy()
    results = {}
    cases = dict(HF_CASES)
    if gpu:
        cases = {"z3_lora": (3, dict(save=True, steps=20, size="1b")), "z3_full": (3, dict(full_ft=True, steps=20,
                                                                                              size="1b")),
                 "z3_lora_offload": (3, dict(steps=20, size="1b", offload=True)),
                 "z2_lora": (2, dict(steps=20, size="1b"))}
    for name, (stage, options) in cases.items():
        for use_sloth in (False, True):
            before = collections.Counter(spy.counts)
            key = f"{name}_{'sloth' if use_sloth else 'plain'}"
            results[key] = _hf_case(out, key, stage, use_sloth, gpu=gpu, **options)
            results[key]["calls"] = dict(spy.counts - before)
    with open(os.path.join(out, "hf.json"), "w") as f:
        json.dump(results, f)


def _lightning_fit(out, name, stage, use_sloth, gpu=False, steps=4, size="tiny", full_ft=False):
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    import sloth_plugins as sloth
    from sloth_plugins.testing import right_pad_collate

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.losses = _model(full_ft, gpu, size), []

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-3)

    ds = {"zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
          "zero_allow_untested_optimizer": True, "train_micro_batch_size_per_gpu": 2}
    if use_sloth:
        base = type(sloth.SlothStrategy("deepspeed", verbose=False))
        kwargs = dict(config=ds, verbose=False)
    else:
        base, kwargs = DeepSpeedStrategy, dict(config=ds)
    if not gpu:
        class OnCPU(base):
            """Lightning refuses DeepSpeed off CUDA by accelerator type; DeepSpeed itself runs on CPU."""
            def setup_environment(self):
                DDPStrategy.setup_environment(self)
        base = OnCPU
        kwargs["parallel_devices"] = [torch.device("cpu", 0)]   # DeepSpeedStrategy checks device indices
    strategy = base(**kwargs)
    module = Module()
    rows = _rows(steps * 2) if size == "tiny" else _rows(steps * 2, low=256, high=1025)
    loader = torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=right_pad_collate)
    trainer = L.Trainer(strategy=strategy, accelerator="gpu" if gpu else "cpu", devices=1, max_steps=steps,
                        precision="bf16-mixed" if gpu else "32-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    report = strategy.sloth_report if use_sloth else None
    return dict(micro=module.losses, report=str(report) if report else None,
                summary=report.summary() if report else None)


def lightning_worker(out, gpu=False):
    spy = Spy()
    results = {}
    cases = {"z3_lora": (3, {}), "z3_full": (3, dict(full_ft=True)), "z2_lora": (2, {})}
    if gpu:
        cases = {k: (stage, {**o, "steps": 20, "size": "1b"}) for k, (stage, o) in cases.items()}
    for name, (stage, options) in cases.items():
        for use_sloth in (False, True):
            before = collections.Counter(spy.counts)
            key = f"{name}_{'sloth' if use_sloth else 'plain'}"
            results[key] = _lightning_fit(out, key, stage, use_sloth, gpu=gpu, **options)
            results[key]["calls"] = dict(spy.counts - before)
    with open(os.path.join(out, "lightning.json"), "w") as f:
        json.dump(results, f)


def _axolotl_run(out, name, stage, use_sloth, model_dir, gpu=False, steps=4):
    import copy

    from axolotl.common.datasets import load_datasets
    from axolotl.integrations.base import PluginManager
    from axolotl.train import train
    from axolotl.utils.config import normalize_config, prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    manager = PluginManager.get_instance()
    manager.plugins.clear()
    manager.cfg = None
    ds_path = os.path.join(out, f"zero{stage}.json")
    with open(ds_path, "w") as f:
        json.dump(_ds_config(stage), f)
    run_dir = os.path.join(out, name)
    raw = dict(base_model=model_dir, datasets=[dict(path=os.path.join(model_dir, "sft.jsonl"), ds_type="json",
                                                    type="input_output")],
               dataset_prepared_path=os.path.join(run_dir, "prepared"), dataset_num_proc=1, val_set_size=0,
               output_dir=os.path.join(run_dir, "out"), sequence_len=96 if not gpu else 1024, sample_packing=False,
               micro_batch_size=2, gradient_accumulation_steps=2, max_steps=steps, num_epochs=1,
               optimizer="adamw_torch", lr_scheduler="cosine", learning_rate=1e-3, bf16=gpu, fp16=False, tf32=False,
               logging_steps=1, save_strategy="no", seed=42, deepspeed=ds_path,
               # Axolotl's own LoRA kernels patch the modules sloth patches (and need CUDA): off in both runs
               lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False, lora_embedding_kernel=False)
    if not name.startswith("z3_full"):
        raw.update(adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True)
    if use_sloth:
        raw.update(plugins=["sloth_plugins.integrations.axolotl.SlothPlugin"], sloth_kernels=True,
                   sloth_loss="chunked")
    cfg = DictDefault(copy.deepcopy(raw))
    prepare_plugins(cfg)
    cfg = validate_config(cfg)
    normalize_config(cfg)
    manager.cfg = cfg
    meta = load_datasets(cfg=cfg)
    torch.manual_seed(0)
    model, _, trainer = train(cfg=cfg, dataset_meta=meta)
    import sloth_plugins as sloth
    state = sloth.get_state(model)
    return dict(micro=[h["loss"] for h in trainer.state.log_history if "loss" in h],
                report=str(state.report) if state else None, summary=state.report.summary() if state else None)


AXOLOTL_CASES = {"z3_lora": 3, "z3_full": 3, "z2_lora": 2}     # name: ZeRO stage ("full": no adapter)


def axolotl_worker(out, gpu=False, case="z3_lora_plain"):
    """One Axolotl run per process: Axolotl destroys the process group when training ends, and
    DeepSpeed keeps groups of it, so a second DeepSpeed run in the same process cannot start."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("make_model", os.path.join(root, "examples/axolotl/make_model.py"))
    make_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_model)
    model_dir = os.path.join(out, "model")
    if not os.path.exists(os.path.join(model_dir, "sft.jsonl")):
        make_model.build(model_dir, shape="llama-3.2-1b" if gpu else "tiny")
    spy = Spy()
    name, which = case.rsplit("_", 1)
    result = _axolotl_run(out, case, AXOLOTL_CASES[name], which == "sloth", model_dir, gpu=gpu,
                          steps=20 if gpu else 4)
    result["calls"] = dict(spy.counts)
    with open(os.path.join(out, f"axolotl_{case}.json"), "w") as f:
        json.dump(result, f)


def hf_two_ranks_worker(out, gpu=False):
    """Two ranks (torchrun, gloo on CPU): each rank's rows have their own lengths, so the ranks' token
    counts differ; the gathers are per module call, never per chunk, so the collectives match."""
    results = {}
    for use_sloth in (False, True):
        key = "sloth" if use_sloth else "plain"
        results[key] = _hf_case(out, f"two_ranks_{key}", 3, use_sloth, gpu=gpu, steps=3)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "hf2.json"), "w") as f:
            json.dump(results, f)


def _worker_env():
    return {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}


if __name__ == "__main__":
    what, out = sys.argv[1], sys.argv[2]
    gpu = "--gpu" in sys.argv
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    for key, value in _worker_env().items():
        os.environ.setdefault(key, value)
    if not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    if what.startswith("axolotl:"):
        axolotl_worker(out, gpu, what.split(":", 1)[1])
    else:
        {"hf": hf_worker, "lightning": lightning_worker, "hf2": hf_two_ranks_worker}[what](out, gpu)
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# Test side
# ---------------------------------------------------------------------------------------------

deepspeed_missing = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install 'sloth_plugins[deepspeed]')")


def _run_worker(what, out, gpu=False, timeout=600, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and os.path.abspath(p) != root)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, os.path.abspath(__file__), what, str(out)] + (["--gpu"] if gpu else [])
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"worker {what} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    with open(os.path.join(out, f"{what.replace(':', '_')}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def hf_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed_hf")
    return out, _run_worker("hf", out)


def _assert_parity(plain, fast, rel):
    assert len(fast["micro"]) == len(plain["micro"]) > 0
    assert fast["micro"] == pytest.approx(plain["micro"], rel=rel)
    assert fast["grad_norm"] == pytest.approx(plain["grad_norm"], rel=rel * 10)


def _fused_loss_ran(result):
    """The fused loss ran on every micro-batch (never the chunked module-head path); the call counts."""
    calls = result["calls"]
    assert calls.get("fused_linear_cross_entropy", 0) == len(result["micro"])
    assert calls.get("chunked_cross_entropy", 0) == 0
    return calls


@deepspeed_missing
@pytest.mark.slow
@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_trainer_deepspeed_matches_the_same_run_without_sloth(hf_results, case):
    _, results = hf_results
    plain, fast = results[f"{case}_plain"], results[f"{case}_sloth"]
    _assert_parity(plain, fast, rel=1e-5)
    summary = fast["summary"]
    if case == "z3_lora_head":
        # LoRA on the head: the chunked loss would call it per chunk (a gather per chunk): not under ZeRO-3
        assert summary["loss"]["patched"] == 0 and "ZeRO-3" in summary["loss"]["why"][0]
        assert fast["calls"].get("fused_linear_cross_entropy", 0) == fast["calls"].get("chunked_cross_entropy", 0) == 0
        assert fast["calls"]["lora_gated_mlp"] == len(fast["micro"]) * 2
        return
    calls = _fused_loss_ran(fast)
    assert "fused linear CE" in summary["loss"]["how"][0] and summary["loss"]["fallback"] == 0
    if case == "z3_lora_auto":
        plan_notes = [n for n in fast["notes"] if n.startswith("gradient_checkpointing auto plan")]
        assert plan_notes and "under DeepSpeed ZeRO-3 the plan does not count the parameters" in plan_notes[-1]
        return
    if not case.startswith("z3_full"):
        recompute = 2 if case.endswith("ckpt") else 1
        # every layer's MLP and o_proj ran fused (q, k, v too), none fell back
        assert calls["lora_gated_mlp"] == len(fast["micro"]) * 2 * recompute
        assert summary["lora_mlp"]["patched"] == 2 and summary["lora_mlp"]["fallback"] == 0
        assert calls["lora_projections"] >= len(fast["micro"]) * 2 * 2 * recompute
    if case.startswith("z3_lora"):
        assert any("ZeRO-3" in how for how in summary["lora_qkv"]["how"])


@deepspeed_missing
@pytest.mark.slow
def test_hf_zero3_two_ranks_with_different_token_counts_match_the_run_without_sloth(tmp_path):
    results = _run_worker("hf2", tmp_path, nproc=2)
    _assert_parity(results["plain"], results["sloth"], rel=1e-5)
    assert results["sloth"]["summary"]["loss"]["fallback"] == 0


@deepspeed_missing
@pytest.mark.slow
def test_hf_zero3_adapter_loads_in_plain_peft_with_the_unpatched_runs_logits(hf_results):
    """The ZeRO-3 run's adapter (consolidated by the Trainer) gives, in plain PEFT on the same base
    model, the logits of the adapter the same run without sloth saved."""
    from peft import PeftModel
    out, _ = hf_results
    batch = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    logits = {}
    for which in ("plain", "sloth"):
        base = _model(full_ft=True, gpu=False, size="tiny")
        model = PeftModel.from_pretrained(base, os.path.join(out, f"z3_lora_{which}", "adapter")).eval()
        with torch.no_grad():
            logits[which] = model(input_ids=batch).logits
    untrained = _model(full_ft=False, gpu=False, size="tiny").eval()
    with torch.no_grad():
        before = untrained(input_ids=batch).logits
    assert not torch.allclose(logits["plain"], before, atol=1e-3)      # the adapter trained
    torch.testing.assert_close(logits["sloth"], logits["plain"], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def lightning_results(tmp_path_factory):
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("deepspeed_lightning")
    return _run_worker("lightning", out)


@deepspeed_missing
@pytest.mark.slow
@pytest.mark.parametrize("case", ["z3_lora", "z3_full", "z2_lora"])
def test_lightning_sloth_deepspeed_strategy_matches_lightnings_deepspeed_strategy(lightning_results, case):
    results = lightning_results
    plain, fast = results[f"{case}_plain"], results[f"{case}_sloth"]
    assert len(fast["micro"]) == len(plain["micro"]) > 0
    assert fast["micro"] == pytest.approx(plain["micro"], rel=1e-5)
    calls = _fused_loss_ran(fast)
    assert "fused linear CE" in fast["summary"]["loss"]["how"][0]
    if case != "z3_full":
        assert calls["lora_gated_mlp"] == len(fast["micro"]) * 2
        assert fast["summary"]["lora_mlp"]["fallback"] == 0


# ---------------------------------------------------------------------------------------------
# GPU (one H200): the same comparisons, bf16, the Llama-3.2-1B shape, 20 steps
# ---------------------------------------------------------------------------------------------

def _bf16_close(plain, fast, rel=2e-2):
    """bf16 runs: sloth's loss is computed in fp32 from bf16 hidden states, the model's from bf16
    logits; per-step losses agree to bf16 rounding and do not drift apart over the steps."""
    assert len(fast["micro"]) == len(plain["micro"]) > 0
    assert fast["micro"] == pytest.approx(plain["micro"], rel=rel)
    first, last = (abs(a - b) / abs(b) for a, b in ((fast["micro"][0], plain["micro"][0]),
                                                     (fast["micro"][-1], plain["micro"][-1])))
    assert last < max(4 * first, 5e-3), (first, last)


@pytest.mark.gpu
@deepspeed_missing
def test_gpu_hf_trainer_deepspeed_matches_the_same_run_without_sloth(tmp_path):
    results = _run_worker("hf", tmp_path, gpu=True, timeout=3000)
    for case in ("z3_lora", "z3_full", "z3_lora_offload", "z2_lora"):
        plain, fast = results[f"{case}_plain"], results[f"{case}_sloth"]
        print(case, "plain", plain["micro"][-3:], plain.get("peak_gib"), "sloth", fast["micro"][-3:],
              fast.get("peak_gib"))
        _bf16_close(plain, fast)
        _fused_loss_ran(fast)
        assert fast["summary"]["loss"]["fallback"] == 0
        if case != "z3_full":
            assert fast["calls"]["lora_gated_mlp"] == len(fast["micro"]) * 16
            assert fast["summary"]["lora_mlp"]["fallback"] == 0, fast["report"]


@pytest.mark.gpu
@deepspeed_missing
def test_gpu_lightning_deepspeed_matches_lightnings_deepspeed_strategy(tmp_path):
    pytest.importorskip("lightning")
    results = _run_worker("lightning", tmp_path, gpu=True, timeout=3000)
    for case in ("z3_lora", "z3_full", "z2_lora"):
        plain, fast = results[f"{case}_plain"], results[f"{case}_sloth"]
        print(case, "plain", plain["micro"][-3:], "sloth", fast["micro"][-3:])
        _bf16_close(plain, fast)
        _fused_loss_ran(fast)


# ---------------------------------------------------------------------------------------------
# Axolotl with `deepspeed:` (DeepSpeed in the Axolotl environment: tests/run.sh installs it there; one
# process per run, about 25 s each on a free 2-core CPU)
# ---------------------------------------------------------------------------------------------

def _axolotl_results(out, gpu):
    return {f"{case}_{which}": _run_worker(f"axolotl:{case}_{which}", out, gpu=gpu, timeout=1800)
            for case in AXOLOTL_CASES for which in ("plain", "sloth")}


def _check_axolotl(results, rel, layers):
    for case in AXOLOTL_CASES:
        plain, fast = results[f"{case}_plain"], results[f"{case}_sloth"]
        assert fast["micro"] == pytest.approx(plain["micro"], rel=rel) and len(fast["micro"]) > 0
        assert fast["calls"].get("fused_linear_cross_entropy", 0) > 0 and not plain["calls"]
        assert all(v["fallback"] == 0 for v in fast["summary"].values()), fast["report"]
        if case.startswith("z3_full"):         # full fine-tuning: no LoRA, the head trained through the fused loss
            assert "lora_mlp" not in fast["summary"] and fast["summary"]["rms_norm"]["patched"] > 0
        else:
            assert fast["calls"]["lora_gated_mlp"] >= layers * len(fast["micro"])


@deepspeed_missing
@pytest.mark.slow
@pytest.mark.axolotl
def test_axolotl_deepspeed_matches_the_run_without_the_plugin(tmp_path):
    pytest.importorskip("axolotl")
    _check_axolotl(_axolotl_results(tmp_path, gpu=False), rel=1e-4, layers=2)


@pytest.mark.gpu
@pytest.mark.axolotl
@deepspeed_missing
def test_gpu_axolotl_deepspeed_matches_the_run_without_the_plugin(tmp_path):
    pytest.importorskip("axolotl")
    _check_axolotl(_axolotl_results(tmp_path, gpu=True), rel=2e-2, layers=16)


@deepspeed_missing
def test_lightning_deepspeed_strategy_options():
    """SlothStrategy("deepspeed") is Lightning's DeepSpeedStrategy: its own arguments, DeepSpeed's config
    dict or path through ``config=`` (a SlothConfig there configures sloth), unknown names refused."""
    pytest.importorskip("lightning")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry

    import sloth_plugins as sloth
    strategy = sloth.SlothStrategy("deepspeed", stage=3, offload_optimizer=True, loss_chunk_size=64, verbose=False)
    assert isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3
    assert strategy.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert strategy.sloth_config == sloth.SlothConfig(loss_chunk_size=64)
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1}
    strategy = sloth.SlothStrategy("deepspeed", config=ds, kernels=["rms_norm"], verbose=False)
    assert strategy.config == ds and strategy.sloth_config == sloth.SlothConfig(kernels=["rms_norm"])
    strategy = sloth.SlothStrategy("deepspeed", config=sloth.SlothConfig(loss="off"), stage=2, verbose=False)
    assert strategy.sloth_config.loss == "off" and strategy.config["zero_optimization"]["stage"] == 2
    assert issubclass(StrategyRegistry["sloth_deepspeed"]["strategy"], DeepSpeedStrategy)
    with pytest.raises(sloth.SlothConfigError, match="did you mean 'stage'"):
        sloth.SlothStrategy("deepspeed", stag=3)
