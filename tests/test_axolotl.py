"""Axolotl + SlothPlugin: real in-process training runs on a tiny local Llama, config checks, conflicts.

Run in the environment that has Axolotl: /work/venvs/axo/bin/pytest tests/test_axolotl.py
"""
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("axolotl")
pytestmark = pytest.mark.axolotl

from axolotl.cli.config import gpu_capabilities  # noqa: E402
from axolotl.common.datasets import load_datasets, load_preference_datasets  # noqa: E402
from axolotl.integrations.base import PluginManager  # noqa: E402
from axolotl.train import train  # noqa: E402
from axolotl.utils.config import normalize_config, prepare_plugins, validate_config  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402

import sloth_plugins as sloth  # noqa: E402
from sloth_plugins.integrations.axolotl import REPORT_FILE, SlothPlugin  # noqa: E402
from sloth_plugins.integrations.axolotl_args import KEYS, conflicts, sloth_config_from  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = str(REPO / "tests" / "data" / "tiny_sft.jsonl")
PLUGIN = "sloth_plugins.integrations.axolotl.SlothPlugin"
AXOLOTL_LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


def _load_make_model():
    spec = importlib.util.spec_from_file_location("sloth_example_make_model", REPO / "examples/axolotl/make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_plugin_manager():
    """Axolotl's PluginManager is a process-wide singleton that keeps plugins between configs.

    Empty it in place: axolotl.train and axolotl.loaders hold module-level references to the
    instance, so replacing it (``PluginManager._instance = None``) would leave them calling the
    old one.
    """
    manager = PluginManager.get_instance()
    manager.plugins.clear()
    manager.cfg = None


@pytest.fixture(autouse=True)
def fresh_plugin_manager():
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _load_make_model().build(str(tmp_path_factory.mktemp("tiny-llama")))


def base_config(model_dir, out, *, plugin=True, adapter="lora", **extra):
    cfg = dict(base_model=model_dir, datasets=[dict(path=DATA, ds_type="json", type="input_output")],
               dataset_prepared_path=os.path.join(out, "prepared"), dataset_num_proc=1, val_set_size=0,
               output_dir=os.path.join(out, "out"), sequence_len=96, sample_packing=False, adapter=adapter,
               lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True, micro_batch_size=2,
               gradient_accumulation_steps=2, max_steps=4, num_epochs=1, optimizer="adamw_torch",
               lr_scheduler="cosine", learning_rate=1e-3, bf16=False, fp16=False, tf32=False, logging_steps=1,
               save_strategy="no", seed=42)
    if adapter == "qlora":
        cfg["load_in_4bit"] = True
    if plugin:
        cfg.update(plugins=[PLUGIN], sloth_kernels=True, sloth_loss="chunked")
    else:  # Axolotl's own LoRA kernels need CUDA
        cfg.update({key: False for key in AXOLOTL_LORA_KERNELS})
    cfg.update(extra)
    return cfg


def validated(raw):
    reset_plugin_manager()
    cfg = DictDefault(copy.deepcopy(raw))
    prepare_plugins(cfg)
    capabilities, env_capabilities = gpu_capabilities()  # as `axolotl train` does
    return validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)


class Run(types.SimpleNamespace):
    pass


def run_training(raw):
    cfg = validated(raw)
    normalize_config(cfg)
    PluginManager.get_instance().cfg = cfg
    meta = (load_preference_datasets if cfg.rl else load_datasets)(cfg=cfg)   # as `axolotl train` picks
    torch.manual_seed(0)  # Axolotl draws the LoRA init before anything seeds the RNG
    model, _, trainer = train(cfg=cfg, dataset_meta=meta)
    plugin = PluginManager.get_instance().plugins.get(PLUGIN)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return Run(cfg=cfg, model=model, trainer=trainer, plugin=plugin, losses=losses)


def _trainable(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _named(name):
    return lambda message: f"{name}: {message}"


def _check_parity(run, ref):
    assert len(run.losses) == len(ref.losses) == 4
    assert run.losses == pytest.approx(ref.losses, rel=2e-5)
    ref_w, got_w = _trainable(ref.model), _trainable(run.model)
    assert ref_w.keys() == got_w.keys() and len(ref_w) == 2 * 7 * 2
    for name in ref_w:
        # Adam turns a tiny gradient's rounding into a visible step: ~1% of one lr-sized step allowed
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-3, atol=2e-5, msg=_named(name))


def _check_report(report):
    assert report.fallbacks() == {}, str(report)
    assert report.count("loss") == 1 and report.count("rms_norm") == 5 and report.count("rope") == 2
    assert report.count("mlp") + report.count("lora_mlp") == 2


@pytest.fixture(scope="module")
def lora_runs(model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora"))
    ref = run_training(base_config(model_dir, out + "/ref", plugin=False, gradient_checkpointing=True))
    got = run_training(base_config(model_dir, out + "/sloth", gradient_checkpointing=True))
    return ref, got


def test_lora_training_matches_the_run_without_the_plugin(lora_runs):
    ref, run = lora_runs
    assert run.plugin is not None and ref.plugin is None
    report = sloth.get_state(run.model).report
    _check_report(report)
    assert report.count("gradient_checkpointing") == 2  # axolotl's gradient_checkpointing: true, sloth recomputes
    assert sloth.get_state(ref.model) is None
    # unset lora_*_kernel keys were taken over (set to false) instead of auto-enabled
    assert [run.cfg[k] for k in AXOLOTL_LORA_KERNELS[:3]] == [False, False, False]
    assert run.plugin.taken_over == list(AXOLOTL_LORA_KERNELS[:3])
    _check_parity(run, ref)
    saved = json.load(open(os.path.join(run.cfg.output_dir, REPORT_FILE)))
    assert saved["taken_over"] == list(AXOLOTL_LORA_KERNELS[:3])
    assert saved["report"]["summary"]["loss"]["patched"] == 1


def test_qlora_training_matches_the_run_without_the_plugin(model_dir, tmp_path):
    ref = run_training(base_config(model_dir, str(tmp_path / "ref"), plugin=False, adapter="qlora"))
    run = run_training(base_config(model_dir, str(tmp_path / "sloth"), adapter="qlora"))
    assert type(run.model.get_base_model().model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    _check_report(sloth.get_state(run.model).report)
    _check_parity(run, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_gpu_training_matches_the_run_without_the_plugin(model_dir, tmp_path, adapter):
    # fp32 compute, so the Triton kernels are held to a tight bound against torch
    ref = run_training(base_config(model_dir, str(tmp_path / "ref"), plugin=False, adapter=adapter,
                                   gradient_checkpointing=True))
    run = run_training(base_config(model_dir, str(tmp_path / "sloth"), adapter=adapter, gradient_checkpointing=True))
    report = sloth.get_state(run.model).report
    assert report.device.startswith("cuda")
    _check_report(report)
    assert len(run.losses) == len(ref.losses) == 4
    assert run.losses == pytest.approx(ref.losses, rel=1e-3)


def test_hooks_called_again_leave_one_patch_and_one_report(lora_runs):
    _, run = lora_runs
    state = sloth.get_state(run.model)
    records, report = len(state.patcher), state.report.to_dict()
    path = os.path.join(run.cfg.output_dir, REPORT_FILE)
    written = open(path).read()
    for _ in range(2):
        run.plugin.post_model_load(run.cfg, run.model)
        run.plugin.post_train(run.cfg, run.model)
    state = sloth.get_state(run.model)
    assert len(state.patcher) == records and state.report.to_dict() == report
    assert open(path).read() == written


def test_metrics_reach_axolotls_tensorboard(model_dir, tmp_path, monkeypatch):
    """Through Axolotl's own callback path (add_callbacks_post_trainer): the Trainer's trackers get sloth's keys."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    run = run_training(base_config(model_dir, str(tmp_path), max_steps=2, use_tensorboard=True,
                                   gradient_checkpointing=True, sloth_gradient_checkpointing="recompute"))
    events = sorted(tmp_path.rglob("events.out.tfevents*"))     # wherever Axolotl points the writer
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [e.value > 0 for e in acc.Scalars("train/sloth/tokens_per_s")] == [True, True]
    assert [e.value for e in acc.Scalars("train/sloth/checkpoint_recomputed_layers")] == [2, 2]
    assert "train/sloth/patch_report/text_summary" in acc.Tags()["tensors"]
    assert all("sloth/tokens_per_s" in h for h in run.trainer.state.log_history if "loss" in h)


def test_auto_decisions_reach_axolotls_console(model_dir, tmp_path, monkeypatch):
    """auto keeping every layer although gradient_checkpointing: true is announced at INFO; Axolotl
    shows INFO only from axolotl.* loggers (sloth_plugins' logger gets its filter too), so the
    plugin re-logs sloth's announcements through its own logger."""
    import logging
    seen = []

    class Seen(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.levelno, record.getMessage()))
    plugin_logger = logging.getLogger("axolotl.integrations.sloth")
    monkeypatch.setattr(plugin_logger, "handlers", [*plugin_logger.handlers, Seen()])
    run_training(base_config(model_dir, str(tmp_path), max_steps=2, gradient_checkpointing=True,
                             sloth_gradient_checkpointing="auto", sloth_memory_budget_gb=64))
    keeps = [m for name, level, m in seen if level == logging.INFO and "auto keeps all 2 layers" in m]
    assert len(keeps) == 1 and "gradient checkpointing is enabled" in keeps[0], seen
    sloth_logger = logging.getLogger("sloth_plugins")
    assert not [f for f in sloth_logger.filters if type(f).__name__ == "AxolotlOrWarnErrorFilter"]


def test_a_module_someone_else_patched_is_left_alone(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    layer = model.get_base_model().model.layers[0]
    foreign = {}
    for name in ("mlp", "input_layernorm", "self_attn"):
        module = getattr(layer, name)
        foreign[name] = types.MethodType(lambda self, *a, **k: type(self).forward(self, *a, **k), module)
        module.forward = foreign[name]  # e.g. Axolotl's lora_mlp_kernel patches layer.mlp.forward like this
    cfg = DictDefault(sloth_kernels=True, sloth_loss="chunked", output_dir=None)
    plugin = SlothPlugin()
    plugin.register(cfg)
    plugin.pre_model_load(cfg)
    plugin.post_model_load(cfg, model)
    for name, method in foreign.items():
        assert getattr(layer, name).forward is method, name
    skipped = " ".join(" ".join(v) for v in plugin.report.fallbacks().values())
    assert "model.layers.0.mlp" in skipped and "model.layers.0.input_layernorm" in skipped
    assert "model.layers.0.self_attn" in skipped
    assert plugin.report.count("rms_norm") == 4 and plugin.report.count("rope") == 1
    sloth.unpatch(model)
    assert layer.mlp.forward is foreign["mlp"]


def test_cli_runs_the_shipped_tiny_example(tmp_path):
    _load_make_model().build(str(tmp_path / "tiny-llama"))  # as the example says: from a work folder
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="disabled", DO_NOT_TRACK="1", AXOLOTL_DO_NOT_TRACK="1")
    env.pop("TRITON_INTERPRET", None)
    cli = os.path.join(os.path.dirname(sys.executable), "axolotl")
    out = subprocess.run([cli, "train", str(REPO / "examples/axolotl/tiny.yml"), "--launcher", "python",
                          "--max-steps", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "sloth_plugins takes over the modules of lora_mlp_kernel" in out.stdout + out.stderr
    saved = json.load(open(tmp_path / "tiny-sloth" / REPORT_FILE))
    assert saved["report"]["summary"]["loss"]["patched"] == 1
    assert (tmp_path / "tiny-sloth" / "adapter_model.safetensors").exists()


# ---- configuration ------------------------------------------------------------------------

def test_keys_map_onto_sloth_config(model_dir, tmp_path):
    cfg = validated(base_config(model_dir, str(tmp_path), sloth_kernels="rms_norm, rope", sloth_loss="off",
                                sloth_gradient_checkpointing="recompute", sloth_memory_budget_gb=40,
                                sloth_loss_chunk_size=2048, sloth_strict=True))
    config = sloth_config_from(cfg)
    assert config.enabled_kernels == ("rms_norm", "rope")
    assert config.replace(kernels=["rms_norm", "rope"]) == sloth.SlothConfig(
        kernels=["rms_norm", "rope"], loss="off", gradient_checkpointing="recompute", memory_budget_gb=40,
        loss_chunk_size=2048, strict=True)
    assert sloth_config_from(validated(base_config(model_dir, str(tmp_path)))) == sloth.SlothConfig()
    assert set(KEYS) == ({"sloth_" + k for k in sloth.SlothConfig().to_dict()}
                         | {"sloth_" + k for k in sloth.SlothConfig().enabled_kernels})
    # per-kernel booleans, as the Liger plugin's liger_rope / liger_rms_norm
    cfg = validated(base_config(model_dir, str(tmp_path), sloth_kernels=None, sloth_rope=False, sloth_mlp=False))
    assert set(sloth_config_from(cfg).enabled_kernels) == {"rms_norm", "lora_mlp", "lora_qkv", "lora_o", "moe_experts"}


@pytest.mark.parametrize("extra, message", [
    (dict(sloth_loss="fused"), "sloth_loss\n  Input should be 'chunked' or 'off'"),
    (dict(sloth_kernels=["rms_norm", "flash"]), "sloth_kernels: unknown kernel name(s) 'flash'; valid: rms_norm, rope"),
    (dict(sloth_gradient_checkpointing="sometimes"), "sloth_gradient_checkpointing\n  Input should be 'auto'"),
    (dict(sloth_memory_budget_gb=-1), "sloth_memory_budget_gb: memory_budget_gb must be a positive number"),
    (dict(sloth_loss_chunk_size=0), "sloth_loss_chunk_size: loss_chunk_size must be a positive int"),
    (dict(sloth_kernels=["rms_norm"], sloth_rope=True), "sloth_rope: true contradicts sloth_kernels: ['rms_norm']"),
    (dict(sloth_kernal=False), "unknown key sloth_kernal (SlothPlugin); valid keys: sloth_kernels, sloth_loss"),
], ids=["loss", "kernel-name", "checkpointing", "budget", "chunk", "per-kernel-contradiction", "unknown-key"])
def test_invalid_values_are_rejected_clearly(model_dir, tmp_path, extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validated(base_config(model_dir, str(tmp_path), **extra))


def test_unquoted_off_in_a_yaml_file_is_read_by_axolotls_loader_as_off(model_dir, tmp_path):
    """``sloth_loss: off`` as the README and the conflict messages write it: YAML reads false."""
    import yaml
    from axolotl.cli.config import load_cfg
    raw = base_config(model_dir, str(tmp_path))
    del raw["sloth_loss"]
    path = tmp_path / "sloth.yml"
    path.write_text(yaml.safe_dump(raw) + "sloth_loss: off\nsloth_gradient_checkpointing: off\n")
    reset_plugin_manager()
    cfg = load_cfg(str(path))
    assert cfg.sloth_loss == "off" and cfg.sloth_gradient_checkpointing == "off"
    assert sloth_config_from(cfg) == sloth.SlothConfig(loss="off", gradient_checkpointing="off")


def test_unset_axolotl_lora_kernels_are_taken_over_only_for_modules_sloth_patches(model_dir, tmp_path):
    raw = base_config(model_dir, str(tmp_path))
    for key in AXOLOTL_LORA_KERNELS:
        raw.pop(key, None)
    without = {k: v for k, v in raw.items() if not k.startswith("sloth_") and k != "plugins"}
    assert validated(without).lora_mlp_kernel is True  # what Axolotl does on its own
    cfg = validated(raw)
    assert (cfg.lora_mlp_kernel, cfg.lora_qkv_kernel, cfg.lora_o_kernel) == (False, False, False)
    cfg = validated({**raw, "sloth_kernels": ["rms_norm"], "sloth_loss": "chunked"})
    assert (cfg.lora_mlp_kernel, cfg.lora_qkv_kernel, cfg.lora_o_kernel) == (True, True, True)
    cfg = validated({**raw, "sloth_kernels": ["rms_norm", "rope"], "lora_mlp_kernel": True})
    assert (cfg.lora_mlp_kernel, cfg.lora_qkv_kernel, cfg.lora_o_kernel) == (True, False, False)
    # the per-kernel booleans hand a module back the same way
    raw.pop("sloth_kernels")
    cfg = validated({**raw, "sloth_mlp": False, "sloth_lora_mlp": False})
    # sloth takes the attention kernels only; Axolotl auto-enables none once some are set
    assert (bool(cfg.lora_mlp_kernel), cfg.lora_qkv_kernel, cfg.lora_o_kernel) == (False, False, False)
    assert "mlp" not in sloth_config_from(cfg).enabled_kernels
    cfg = validated({**raw, "sloth_mlp": False, "sloth_lora_mlp": False, "lora_mlp_kernel": True})
    assert (cfg.lora_mlp_kernel, cfg.lora_qkv_kernel, cfg.lora_o_kernel) == (True, False, False)


LIGER = "axolotl.integrations.liger.LigerPlugin"
CCE = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"


@pytest.mark.parametrize("extra, message", [
    (dict(lora_mlp_kernel=True), "lora_mlp_kernel: True and sloth_kernels (lora_mlp, mlp) both patch the MLP "
                                 "forward: set lora_mlp_kernel: false, or set sloth_kernels: "),
    (dict(lora_qkv_kernel=True), "lora_qkv_kernel: True and sloth_kernels (lora_o, lora_qkv, rope) both patch the "
                                 "attention forward: set lora_qkv_kernel: false"),
    (dict(plugins=[LIGER, PLUGIN], liger_rms_norm=True), "liger_rms_norm: True and sloth_kernels (rms_norm) both "
                                                         "replace RMSNorm: set liger_rms_norm: false"),
    (dict(plugins=[PLUGIN, LIGER], liger_fused_linear_cross_entropy=True),
     "liger_fused_linear_cross_entropy: True and sloth_loss: chunked both compute the causal-LM loss "
     "(Liger fused linear CE): set liger_fused_linear_cross_entropy: false, or set sloth_loss: off"),
    (dict(plugins=[CCE, PLUGIN], bf16=True), "cut_cross_entropy: True and sloth_loss: chunked both compute the "
                                             "causal-LM loss (Cut Cross Entropy plugin)"),
    (dict(chunked_cross_entropy=True), "chunked_cross_entropy: True and sloth_loss: chunked"),
    (dict(tiled_mlp=True), "tiled_mlp: True and sloth_kernels (lora_mlp, mlp) both replace the MLP forward"),
    (dict(gradient_checkpointing=True, activation_offloading=True),
     "activation_offloading: True and sloth_gradient_checkpointing: auto both manage the decoder layers' "
     "activations: set activation_offloading: false and gradient_checkpointing: true"),
    (dict(gradient_checkpointing="offload"), "sloth_gradient_checkpointing: auto both manage the decoder layers'"),
], ids=["lora_mlp_kernel", "lora_qkv_kernel", "liger_rms_norm", "liger_flce", "cce", "chunked_ce", "tiled_mlp",
        "activation_offloading", "gc_offload"])
def test_conflicts_are_refused_naming_the_key(model_dir, tmp_path, extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validated(base_config(model_dir, str(tmp_path), **extra))


@pytest.mark.parametrize("extra", [
    dict(lora_mlp_kernel=True, sloth_kernels=["rms_norm", "rope", "lora_qkv", "lora_o"]),
    dict(plugins=[LIGER, PLUGIN], liger_fused_linear_cross_entropy=True, sloth_loss="off"),
    dict(plugins=[LIGER, PLUGIN], liger_rms_norm=True, sloth_kernels=["rope", "mlp"]),
    dict(gradient_checkpointing=True, activation_offloading=True, sloth_gradient_checkpointing="off"),
    dict(gradient_checkpointing=True, sloth_gradient_checkpointing="auto"),
], ids=["keep-axolotl-mlp-kernel", "liger-loss", "liger-norm", "axolotl-offloading", "sloth-owns-recompute"])
def test_the_suggested_fixes_validate(model_dir, tmp_path, extra):
    validated(base_config(model_dir, str(tmp_path), **extra))


def test_fsdp_activation_checkpointing_and_sloth_recompute_clash():
    get = {"fsdp_config": {"activation_checkpointing": True}}.get
    assert conflicts(get, sloth.SlothConfig(gradient_checkpointing="recompute"))
    assert conflicts(get, sloth.SlothConfig(gradient_checkpointing="auto")) == []
    assert conflicts(get, sloth.SlothConfig(gradient_checkpointing="off")) == []


def test_pre_model_load_refuses_a_config_that_skipped_validation():
    cfg = DictDefault(sloth_kernels=True, liger_rms_norm=True)
    with pytest.raises(ValueError, match="liger_rms_norm: True and sloth_kernels"):
        SlothPlugin().pre_model_load(cfg)


def test_resume_from_a_checkpoint_matches_the_resumed_run_without_the_plugin(model_dir, tmp_path):
    """Train 2 of 4 steps saving a checkpoint, resume to step 4: with the plugin, the resumed losses and
    weights equal the same resume without it (HF's resume is not bit-equal to an uninterrupted run by
    itself, so resumed is compared with resumed)."""
    def resumed(out, plugin):
        first = base_config(model_dir, out, plugin=plugin, gradient_checkpointing=True, save_strategy="steps",
                            save_steps=2, max_steps=2)
        first["lr_scheduler"] = "constant"      # the same schedule whether the run stops at 2 or 4
        run_training(first)
        second = dict(first, max_steps=4, resume_from_checkpoint=os.path.join(out, "out", "checkpoint-2"))
        return run_training(second)

    ref, run = resumed(str(tmp_path / "ref"), False), resumed(str(tmp_path / "sloth"), True)
    assert run.trainer.state.global_step == ref.trainer.state.global_step == 4
    assert sloth.get_state(run.model) is not None and sloth.get_state(ref.model) is None
    _check_parity(run, ref)


# Preference training (Axolotl `rl: dpo` / `rl: kto`, TRL's trainers under Axolotl's subclasses)
RL_DATA = Path(__file__).resolve().parent / "data"
RL_DATASETS = {
    "dpo": [dict(path=str(RL_DATA / "tiny_dpo.jsonl"), ds_type="json", split="train", type="passthrough")],
    "kto": [dict(path=str(RL_DATA / "tiny_kto.jsonl"), ds_type="json", split="train",
                 type=dict(field_prompt="prompt", field_completion="completion", field_label="label"))],
}


def rl_config(model_dir, out, rl, *, plugin=True):
    cfg = base_config(model_dir, out, plugin=plugin, rl=rl, datasets=RL_DATASETS[rl], max_steps=3,
                      gradient_accumulation_steps=1, micro_batch_size=2, sequence_len=64)
    if rl == "kto":   # TRL's KTO needs more than one sample of each label in a batch for its KL term
        cfg.update(micro_batch_size=4, remove_unused_columns=False)
    return cfg


@pytest.mark.parametrize("rl, trainer", [("dpo", "DPOTrainer"), ("kto", "KTOTrainer")])
def test_preference_training_matches_the_run_without_the_plugin(model_dir, tmp_path, rl, trainer):
    ref = run_training(rl_config(model_dir, str(tmp_path / "ref"), rl, plugin=False))
    run = run_training(rl_config(model_dir, str(tmp_path / "sloth"), rl))
    assert type(run.trainer).__name__.startswith("Axolotl") and trainer in [c.__name__ for c in type(run.trainer).__mro__]
    assert len(ref.losses) == len(run.losses) == 3
    assert run.losses == pytest.approx(ref.losses, rel=2e-5)
    report = sloth.get_state(run.model).report
    assert report.count("loss") == 0 and report.count("rms_norm") == 5 and report.count("rope") == 2
    owner = [n for n in report.notes if f"TRL {trainer}" in n]
    assert owner and "sloth's chunked loss is off for this trainer" in owner[0], str(report)
    saved = json.loads((tmp_path / "sloth" / "out" / REPORT_FILE).read_text())
    assert any(f"TRL {trainer}" in n for n in saved["report"]["notes"])
    assert any(f"Axolotl rl: {rl} " in n for n in saved["report"]["notes"]) and saved["config"]["loss"] == "off"



# Online RL (Axolotl `rl: grpo`): TRL's GRPOTrainer samples completions with transformers' generate (no vLLM),
# scores them with a python reward named by module path, and computes its loss from the policy's log-probs.
GRPO_TRL = dict(use_vllm=False, num_generations=2, max_completion_length=6, beta=0.04,
                reward_funcs=["tiny_grpo_rewards.vowel_share"])
GRPO_METRICS = ("reward", "reward_std", "rewards/vowel_share/mean", "kl", "entropy", "grad_norm")


def grpo_config(model_dir, out, *, plugin=True):
    datasets = [dict(path=str(RL_DATA / "tiny_grpo.jsonl"), ds_type="json", split="train", type="passthrough")]
    # 2 prompts x 2 completions per optimizer step, one generation per step; a large lr so that a difference in
    # the patched policy's log-probs or gradients would show in the next step's samples, rewards and KL
    return base_config(model_dir, out, plugin=plugin, rl="grpo", datasets=datasets, trl=dict(GRPO_TRL), max_steps=3,
                       gradient_accumulation_steps=2, micro_batch_size=2, sequence_len=64, learning_rate=1e-1,
                       warmup_steps=0, gradient_checkpointing=True)


def test_grpo_training_matches_the_run_without_the_plugin(model_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(RL_DATA))     # the reward module, as `axolotl train` imports it from the cwd
    ref = run_training(grpo_config(model_dir, str(tmp_path / "ref"), plugin=False))
    run = run_training(grpo_config(model_dir, str(tmp_path / "sloth")))
    assert type(run.trainer).__name__ == "AxolotlGRPOTrainer" and not run.trainer.use_vllm
    ref_logs, run_logs = ([h for h in r.trainer.state.log_history if "loss" in h] for r in (ref, run))
    assert len(ref_logs) == len(run_logs) == 3
    # Seeded sampling from policies that agree: the same completions, hence the same rewards, every step
    assert list(run.trainer._logs["completion"]) == list(ref.trainer._logs["completion"])
    for step, (got, want) in enumerate(zip(run_logs, ref_logs)):
        for key in GRPO_METRICS:
            assert got[key] == pytest.approx(want[key], rel=2e-5, abs=1e-7), f"step {step + 1} {key}"
        # GRPO's loss is ~0 by construction (advantages of a group sum to zero): compared at the size of its terms
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6), f"step {step + 1} loss"
    assert any(log["kl"] > 0 for log in ref_logs) and any(log["reward_std"] > 0 for log in ref_logs)
    ref_w, got_w = _trainable(ref.model), _trainable(run.model)
    assert ref_w.keys() == got_w.keys() and len(ref_w) == 2 * 7 * 2
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-3, atol=2e-5, msg=_named(name))
    # the plugin's kernels ran under GRPOTrainer; the loss is TRL's
    report = sloth.get_state(run.model).report
    assert report.fallbacks() == {}, str(report)
    assert report.count("loss") == 0 and report.count("rms_norm") == 5 and report.count("rope") == 2
    assert report.count("lora_mlp") == report.count("lora_qkv") == report.count("lora_o") == 2
    assert report.count("gradient_checkpointing") == 2
    owner = [n for n in report.notes if "TRL GRPOTrainer" in n]
    assert owner and "sloth's chunked loss is off for this trainer" in owner[0], str(report)
    saved = json.loads((tmp_path / "sloth" / "out" / REPORT_FILE).read_text())
    assert saved["config"]["loss"] == "off"
    assert any("Axolotl rl: grpo trains with its TRL-based trainer" in n for n in saved["report"]["notes"])
    assert any("TRL GRPOTrainer" in n for n in saved["report"]["notes"])
