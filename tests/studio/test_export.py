"""The exported script trains what the studio trained: same loss, step by step, on the tiny model."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from sloth_plugins.studio.export import axolotl_yaml, python_script
from sloth_plugins.studio.runs import RunManager

pytestmark = pytest.mark.slow


# Under TRL < 1.16 (the Axolotl environment) SFTTrainer wraps the model in PEFT before seeding, so LoRA A
# was drawn from an unseeded RNG and two runs of the same script differed after the first non-zero update;
# the worker and the script now seed before building SFTTrainer (as TRL >= 1.16 does itself).
def test_exported_script_gives_the_studio_loss(tmp_path, run_config, dataset_file):
    manager = RunManager(str(tmp_path / "runs"))
    config = run_config(max_steps=12, gradient_accumulation_steps=2, lr_scheduler_type="cosine", warmup_steps=2)
    run_id = manager.create(config, dataset_file)
    manager.start(run_id)
    assert manager.wait(run_id, timeout=300)["state"] == "finished", manager.log_tail(run_id)
    studio_losses = [m["loss"] for m in manager.metrics(run_id)]

    run_dir = manager.run_dir(run_id)
    stored = manager.config(run_id)
    script = python_script(stored, os.path.join(run_dir, stored["dataset"]["file"]), output_dir="out")
    work = tmp_path / "script"
    work.mkdir()
    (work / "train.py").write_text(script)
    out = subprocess.run([sys.executable, "train.py"], cwd=work, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    history = json.loads((work / "out" / "trainer_state.json").read_text())["log_history"]
    script_losses = [h["loss"] for h in history if "loss" in h]
    assert len(script_losses) == len(studio_losses) == 12
    assert script_losses == pytest.approx(studio_losses, rel=1e-5)
    assert len(set(studio_losses)) > 6   # it trained (warm-up, then updates that change the loss)
    assert (work / "out" / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_exported_script_compiles_for_each_method(run_config, method):
    config = {**run_config(), "method": method}
    script = python_script(config, "/data/train.jsonl")
    compile(script, "train.py", "exec")
    assert ("LoraConfig(" in script) == (method != "full")
    assert ("nf4" in script) == (method == "qlora")
    assert "callbacks=[SlothCallback(sloth)]" in script


@pytest.mark.parametrize("mapping", [{"format": "messages", "messages": "chat"},
                                     {"format": "sharegpt", "conversations": "conv"},
                                     {"format": "text", "text": "body"},
                                     {"format": "alpaca", "instruction": "q", "input": "ctx", "output": "a"}])
def test_exported_script_compiles_for_each_format(run_config, mapping):
    config = run_config()
    config["dataset"]["mapping"] = mapping
    compile(python_script(config, "/data/train.parquet"), "train.py", "exec")


def test_axolotl_yaml_has_the_plugin_and_the_settings(run_config):
    config = {**run_config(max_steps=7, gradient_accumulation_steps=3), "lora": {"r": 4, "alpha": 8},
              "sloth": {"gradient_checkpointing": "recompute", "kernels": ["rms_norm", "rope"]}}
    data = yaml.safe_load(axolotl_yaml(config, "/runs/x/data/train_text.jsonl"))
    assert data["plugins"] == ["sloth_plugins.integrations.axolotl.SlothPlugin"]
    assert data["sloth_gradient_checkpointing"] == "recompute" and data["sloth_kernels"] == ["rms_norm", "rope"]
    assert "sloth_memory_budget_gb" not in data   # None: the plugin's default
    assert data["datasets"] == [{"path": "/runs/x/data/train_text.jsonl", "ds_type": "json", "type": "completion",
                                 "field": "text"}]
    assert (data["adapter"], data["lora_r"], data["lora_alpha"], data["lora_target_linear"]) == ("lora", 4, 8, True)
    assert (data["max_steps"], data["gradient_accumulation_steps"], data["sequence_len"]) == (7, 3, 64)


def test_merged_export_loads_in_plain_transformers_with_the_peft_logits(tmp_path, finished_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sloth_plugins.studio.export import merge_adapter
    manager, run_id = finished_run
    config, run_dir = manager.config(run_id), manager.run_dir(run_id)
    merged_dir = merge_adapter(run_dir, config, str(tmp_path / "merged"))
    assert not os.path.exists(os.path.join(merged_dir, "adapter_config.json"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["model"]),
                                     os.path.join(run_dir, "adapter")).eval()
    ids = torch.randint(3, 300, (2, 24))
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, peft(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(config["model"]).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)      # the adapter is in the merged weights
    assert os.path.isfile(os.path.join(merged_dir, "tokenizer_config.json"))


def test_adapter_zip_holds_the_adapter(tmp_path, finished_run):
    import zipfile

    from sloth_plugins.studio.export import adapter_zip
    manager, run_id = finished_run
    path = adapter_zip(manager.run_dir(run_id))
    assert path.startswith(manager.run_dir(run_id))          # stays inside the runs folder
    adapter = os.path.join(manager.run_dir(run_id), "adapter")
    with zipfile.ZipFile(path) as z:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(z.namelist())
        assert z.read("adapter_model.safetensors") == open(os.path.join(adapter, "adapter_model.safetensors"),
                                                           "rb").read()


def test_full_run_has_nothing_to_merge(finished_run):
    from sloth_plugins.studio.export import merge_adapter
    from sloth_plugins.studio.runs import StudioError
    manager, run_id = finished_run
    with pytest.raises(StudioError, match="nothing to merge"):
        merge_adapter(manager.run_dir(run_id), {**manager.config(run_id), "method": "full"})
