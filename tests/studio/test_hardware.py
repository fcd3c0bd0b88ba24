"""The hardware panel: the memory a run will need, from the checkpointing plan, before it starts;
and the PatchReport it would get."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sloth_plugins import SlothConfig, patch
from sloth_plugins.checkpointing import get_checkpoint_controller
from sloth_plugins.checkpointing.plan import KEEP, OFFLOAD, RECOMPUTE, predict_peak
from sloth_plugins.studio.config import check_run_config, lora_config_kwargs
from sloth_plugins.studio.hardware import PROBE_TOKENS, devices_text, estimate_memory, run_patch_report, trl_loss_note

ALPACA = {"format": "alpaca", "instruction": "instruction", "input": None, "output": "response"}
CPU = []   # the device list of a machine without a GPU


def config_for(model_dir, method="lora", **sloth):
    return check_run_config({"model": model_dir, "method": method, "dataset": {"mapping": dict(ALPACA)},
                             "lora": {"r": 4, "alpha": 8}, "sloth": sloth,
                             "training": {"per_device_train_batch_size": 2, "max_length": 48}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU wording")
def test_without_gpu_it_says_cpu_run():
    assert devices_text().startswith("no GPU: CPU run")


def test_gpu_list_shows_free_memory():
    text = devices_text([{"index": 0, "name": "NVIDIA H200", "total_gib": 139.8, "free_gib": 120.25}])
    assert text == "cuda:0  NVIDIA H200: 120.2 GiB free of 139.8 GiB"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_layer_estimate_is_what_auto_measures_in_the_real_run(model_dir, method):
    """The one-layer CPU probe, scaled to the run's tokens, gives the numbers auto measures on the
    whole model in its first training forward at those tokens."""
    config = config_for(model_dir, method)
    estimate = estimate_memory(config, CPU)
    assert estimate.tokens == 2 * 48 != PROBE_TOKENS and estimate.layers == 2
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(**lora_config_kwargs(config["lora"])))
    model.train()
    patch(model, SlothConfig(memory_budget_gb=1000.0))
    ids = torch.randint(3, 300, (2, 48))
    model(input_ids=ids, labels=ids).loss.backward()
    measured = get_checkpoint_controller(model).meter.layer_memory
    assert estimate.layer.input_bytes == measured[0].input_bytes
    assert estimate.layer.full_bytes == pytest.approx(measured[0].full_bytes, rel=0.02)
    assert estimate.layer.full_bytes > 4 * estimate.layer.input_bytes


def test_weights_and_trainable_state_count_the_real_parameters(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    lora = estimate_memory(config_for(model_dir, "lora"), CPU)
    assert lora.weights_bytes == 4 * params
    peft = get_peft_model(model, LoraConfig(**lora_config_kwargs(config_for(model_dir)["lora"])))
    adapter = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert lora.trainable_bytes == 16 * adapter   # fp32 weight, gradient, AdamW's two moments
    full = estimate_memory(config_for(model_dir, "full"), CPU)
    assert full.trainable_bytes == 12 * params    # fp32 gradient and two moments


def test_plan_follows_the_checkpointing_mode_and_budget(model_dir):
    recompute = estimate_memory(config_for(model_dir, gradient_checkpointing="recompute"), CPU)
    assert recompute.decisions == (RECOMPUTE, RECOMPUTE)
    assert estimate_memory(config_for(model_dir, gradient_checkpointing="off"), CPU).decisions == (RECOMPUTE,) * 2
    assert estimate_memory(config_for(model_dir, gradient_checkpointing="offload"), CPU).decisions == (OFFLOAD,
                                                                                                        RECOMPUTE)
    assert estimate_memory(config_for(model_dir), CPU).decisions == (RECOMPUTE,) * 2   # auto without a budget
    roomy = estimate_memory(config_for(model_dir, memory_budget_gb=100.0), CPU)
    assert roomy.decisions == (KEEP, KEEP) and roomy.budget_bytes == 100 * 2 ** 30
    keep_peak, recompute_peak = roomy.peak_bytes, recompute.peak_bytes
    assert keep_peak > recompute_peak
    tight = estimate_memory(config_for(model_dir, memory_budget_gb=(keep_peak + recompute_peak) / 2 / 2 ** 30), CPU)
    assert RECOMPUTE in tight.decisions and KEEP in tight.decisions and tight.peak_bytes <= tight.budget_bytes
    assert tight.peak_bytes == predict_peak([tight.layer] * 2, tight.decisions, _memory_model(tight))
    over = estimate_memory(config_for(model_dir, memory_budget_gb=1e-6), CPU)
    assert any("over budget" in note for note in over.notes)
    assert "estimated peak" in roomy.summary() and "2 keep" in roomy.summary()


def _memory_model(estimate):
    from sloth_plugins.checkpointing.plan import MemoryModel
    return MemoryModel(estimate.weights_bytes + estimate.trainable_bytes, estimate.loss_bytes, estimate.loss_bytes, 0)


def _rows(report: str):
    return [line.split()[:3] for line in report.splitlines() if line.startswith("  ") and not
            line.strip().startswith(("note", "no CUDA"))]


@pytest.mark.slow
def test_patch_report_before_the_start_is_the_one_the_run_got(finished_run):
    manager, run_id = finished_run
    before = run_patch_report(manager.config(run_id))
    assert "lora_qkv" in before   # built with the run's LoRA
    got = manager.patch_report(run_id)
    # the model's rows are the run's; the loss row is the trainer's, which the note says
    assert [r for r in _rows(before) if r[0] != "loss"] == [r for r in _rows(got) if r[0] != "loss"]
    assert ["loss", "patched", "1"] in _rows(before)
    note = trl_loss_note()
    assert note in before
    if "falls back" in note:      # TRL < 1.16 (the Axolotl environment)
        assert ["loss", "patched", "0"] in _rows(got) and "TRL's SFTTrainer already replaced" in got
    else:
        assert ["loss", "patched", "1"] in _rows(got) and "fused LM head" in got
    assert "lora_qkv" not in run_patch_report({**manager.config(run_id), "method": "full"})


@pytest.mark.gpu
def test_gpu_estimate_is_near_the_measured_peak(tmp_path):
    """On a GPU: the estimate before the run against the peak the run's worker measured
    (torch.cuda.max_memory_allocated), packed rows so every micro-batch has batch x max_length tokens."""
    from sloth_plugins.studio.runs import RunManager
    from sloth_plugins.testing import DATA_FILE, format_example, load_instructions, tiny_model, train_tokenizer
    tokenizer = train_tokenizer(format_example(r) for r in load_instructions())
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816,
                       num_attention_heads=16, num_key_value_heads=4, layers=8, max_position_embeddings=2048,
                       dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = {"model": str(tmp_path / "model"), "dataset": {"mapping": dict(ALPACA)},
              "training": dict(max_steps=4, max_length=1024, per_device_train_batch_size=4, packing=True,
                               precision="bf16", save_steps=100)}
    estimate = estimate_memory(check_run_config(config))
    manager = RunManager(str(tmp_path / "runs"))
    run_id = manager.create(config, DATA_FILE)
    manager.start(run_id)
    assert manager.wait(run_id, timeout=600)["state"] == "finished", manager.log_tail(run_id)
    measured = max(m["peak_memory_gb"] for m in manager.metrics(run_id)) * 2 ** 30
    assert estimate.peak_bytes == pytest.approx(measured, rel=0.35), (estimate.summary(), measured / 2 ** 30)
