"""Hostile use of the framework adapters: misspelt options, resuming from checkpoints.

The Lightning tests need lightning; the Axolotl ones need axolotl (skipped without it, like
tests/test_axolotl.py, whose patterns they follow).
"""
import copy
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

import sloth_plugins as sloth
from sloth_plugins.testing import tiny_model

HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
HAS_AXOLOTL = importlib.util.find_spec("axolotl") is not None
needs_lightning = pytest.mark.skipif(not HAS_LIGHTNING, reason="needs lightning")
needs_axolotl = pytest.mark.skipif(not HAS_AXOLOTL, reason="needs axolotl")
REPO = Path(__file__).resolve().parents[2]


# ---- Lightning --------------------------------------------------------------------------------

@needs_lightning
@pytest.mark.parametrize("kind", ["single", "ddp", "fsdp", "fsdp2"])
def test_lightning_unknown_argument_fails_when_the_strategy_is_built(kind):
    from sloth_plugins.integrations.lightning import SlothStrategy
    with pytest.raises(sloth.SlothConfigError, match=re.escape(
            f"SlothStrategy({kind!r}) got unknown argument 'kernal' (did you mean 'kernels'?); "
            f"sloth options: kernels, loss")):
        SlothStrategy(kind, kernal=True)


@needs_lightning
def test_lightning_wrapper_arguments_still_pass_through():
    from sloth_plugins.integrations.lightning import SlothStrategy
    ddp = SlothStrategy("ddp", find_unused_parameters=True, bucket_cap_mb=25, timeout=None, loss="off")
    assert ddp._ddp_kwargs == {"find_unused_parameters": True, "bucket_cap_mb": 25}
    assert ddp.sloth_config.loss == "off"
    fsdp = SlothStrategy("fsdp", limit_all_gathers=True, cpu_offload=False)
    assert fsdp.kwargs["limit_all_gathers"] is True
    assert SlothStrategy("fsdp2", data_parallel_size=1, reshard_after_forward=False)._sloth_reshard is False
    with pytest.raises(sloth.SlothConfigError, match="'find_unused_parametrs' \\(did you mean 'find_unused_parameters'"):
        SlothStrategy("ddp", find_unused_parametrs=True)


def _lightning_batches():
    """16 right-padded rows (labels -100 on padding) in a fixed order: 4 batches of 4."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        ids = torch.randint(3, 384, (24,), generator=g)
        mask = (torch.arange(24) < 24 - (i % 5) * 3).long()
        rows.append(dict(input_ids=ids * mask, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))
    return torch.utils.data.DataLoader(rows, batch_size=4)


def _lightning_module():
    import lightning as L
    from peft import LoraConfig, get_peft_model

    class TinyLoRA(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = get_peft_model(tiny_model("llama", vocab_size=384), LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
            self.losses = []

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-3)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)]

    return TinyLoRA()


@needs_lightning
def test_lightning_resume_from_a_model_checkpoint_continues_the_same_run(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sloth_plugins.integrations.lightning import SlothStrategy

    def fit(max_steps, ckpt_path=None, callbacks=()):
        module = _lightning_module()
        strategy = SlothStrategy(gradient_checkpointing="recompute", padding_free=True, verbose=False)
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=2, max_steps=max_steps,
                            accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=bool(callbacks),
                            callbacks=list(callbacks))
        module.model.gradient_checkpointing_enable()
        trainer.fit(module, _lightning_batches(), ckpt_path=ckpt_path)
        return module, trainer

    ref, _ = fit(4)                       # 2 epochs of 2 optimizer steps, uninterrupted
    # saved at step 2, the end of epoch 0: Lightning resumes a plain DataLoader only at an epoch boundary
    # (mid-epoch it warns and starts the epoch's batches over, with or without sloth)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    first, _ = fit(2, callbacks=[checkpoint])
    path = checkpoint.best_model_path or checkpoint.last_model_path
    assert os.path.exists(path), os.listdir(tmp_path)
    state = torch.load(path, weights_only=False)
    assert not any("sloth" in key for key in state["state_dict"])
    resumed, trainer = fit(4, ckpt_path=path)
    assert trainer.global_step == 4 and sloth.get_state(resumed.model) is not None
    assert len(first.losses) == len(resumed.losses) == 4
    assert first.losses + resumed.losses == pytest.approx(ref.losses, rel=1e-6)
    ref_w = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    for name, value in resumed.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(value, ref_w[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


# ---- Axolotl ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def axolotl_model_dir(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("sloth_example_make_model", REPO / "examples/axolotl/make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture
def fresh_axolotl_plugins():
    from axolotl.integrations.base import PluginManager

    def reset():  # emptied in place: axolotl modules hold the singleton (see tests/test_axolotl.py)
        manager = PluginManager.get_instance()
        manager.plugins.clear()
        manager.cfg = None

    reset()
    yield
    reset()


def _axolotl_config(model_dir, out, **extra):
    cfg = dict(base_model=model_dir,
               datasets=[dict(path=str(REPO / "tests" / "data" / "tiny_sft.jsonl"), ds_type="json",
                              type="input_output")],
               dataset_prepared_path=os.path.join(out, "prepared"), dataset_num_proc=1, val_set_size=0,
               output_dir=os.path.join(out, "out"), sequence_len=96, sample_packing=False, adapter="lora",
               lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True, micro_batch_size=2,
               gradient_accumulation_steps=2, max_steps=4, num_epochs=1, optimizer="adamw_torch",
               learning_rate=1e-3, bf16=False, fp16=False, tf32=False, save_strategy="no", seed=42,
               plugins=["sloth_plugins.integrations.axolotl.SlothPlugin"], sloth_kernels=True,
               sloth_loss="chunked")
    cfg.update(extra)
    return cfg


def _validated(raw):
    from axolotl.cli.config import gpu_capabilities
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(copy.deepcopy(raw))
    prepare_plugins(cfg)
    capabilities, env_capabilities = gpu_capabilities()
    return validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)


@pytest.mark.axolotl
@needs_axolotl
@pytest.mark.usefixtures("fresh_axolotl_plugins")
def test_axolotl_unknown_sloth_key_in_a_yaml_config_names_the_valid_keys(axolotl_model_dir, tmp_path):
    """Through ``load_cfg``, what ``axolotl train config.yml`` reads the file with."""
    import yaml
    from axolotl.cli.config import load_cfg

    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(_axolotl_config(axolotl_model_dir, str(tmp_path), sloth_kernal=True)))
    with pytest.raises(ValueError, match=re.escape(
            "unknown key sloth_kernal (SlothPlugin); valid keys: sloth_kernels, sloth_loss")):
        load_cfg(str(path))


@pytest.mark.axolotl
@needs_axolotl
@pytest.mark.usefixtures("fresh_axolotl_plugins")
def test_axolotl_sloth_kernels_as_a_map_switches_kernels_off(axolotl_model_dir, tmp_path):
    from sloth_plugins.integrations.axolotl_args import sloth_config_from

    cfg = _validated(_axolotl_config(axolotl_model_dir, str(tmp_path), sloth_kernels={"mlp": False,
                                                                                     "lora_mlp": False}))
    assert sloth_config_from(cfg).enabled_kernels == ("rms_norm", "rope", "lora_qkv", "lora_o",
                                                         "moe_experts")
    # sloth takes over the attention modules only; the MLP is not its to switch off
    assert (cfg.lora_qkv_kernel, cfg.lora_o_kernel) == (False, False) and cfg.lora_mlp_kernel is not False
    with pytest.raises(ValueError, match=re.escape("sloth_kernels: unknown kernel name(s) 'mpl'")):
        _validated(_axolotl_config(axolotl_model_dir, str(tmp_path), sloth_kernels={"mpl": False}))
