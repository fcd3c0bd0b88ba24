"""Lightning + SlothStrategy: real fits of a tiny HF Llama + PEFT LoRA, against the default strategy."""
import subprocess
import sys
import warnings

import pytest
import torch

L = pytest.importorskip("lightning")
from lightning.pytorch.plugins.precision import FSDPPrecision  # noqa: E402
from lightning.pytorch.strategies import (  # noqa: E402
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    StrategyRegistry,
)
from peft import LoraConfig, get_peft_model  # noqa: E402

import sloth_plugins as sloth  # noqa: E402
from sloth_plugins.integrations.lightning import SlothStrategy  # noqa: E402
from sloth_plugins.testing import format_example, load_instructions, tiny_model, train_tokenizer  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(format_example(r) for r in load_instructions())


@pytest.fixture(scope="module")
def batches(tokenizer):
    """16 padded examples (labels -100 on padding) in a fixed order: 4 batches of 4."""
    texts = [format_example(r) for r in load_instructions(limit=16)]
    enc = tokenizer(texts, truncation=True, max_length=40, padding="longest", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    rows = [dict(input_ids=enc["input_ids"][i], attention_mask=enc["attention_mask"][i], labels=labels[i])
            for i in range(16)]
    return torch.utils.data.DataLoader(rows, batch_size=4)


def make_module_class(base):
    class TinyLoRA(base):
        def __init__(self, vocab_size=384, seed=0, lr=2e-3, peft=True):
            super().__init__()
            model = tiny_model("llama", seed=seed, vocab_size=vocab_size)
            if peft:
                model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
            self.model, self.lr, self.losses = model, lr, []

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.losses.append(loss.item())
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.model(**batch).loss)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    return TinyLoRA


TinyLoRA = make_module_class(L.LightningModule)


def _fit(batches, strategy, *, steps=None, epochs=1, module=None, ckpt_path=None, **trainer_kw):
    module = module if module is not None else TinyLoRA()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=epochs,
                        max_steps=steps if steps is not None else -1, **{**QUIET, **trainer_kw})
    trainer.fit(module, batches, ckpt_path=ckpt_path)
    return module, trainer


def _trainable(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _named(name):
    return lambda message: f"{name}: {message}"


def test_strategy_classes_and_registry_names():
    assert isinstance(SlothStrategy(), SingleDeviceStrategy)
    assert isinstance(SlothStrategy("ddp"), DDPStrategy)
    assert isinstance(SlothStrategy("fsdp"), FSDPStrategy)
    assert sloth.SlothStrategy is SlothStrategy
    for name, base in (("sloth", SingleDeviceStrategy), ("sloth_ddp", DDPStrategy), ("sloth_fsdp", FSDPStrategy)):
        assert name in StrategyRegistry.available_strategies()
        assert issubclass(StrategyRegistry[name]["strategy"], base)
    trainer = L.Trainer(strategy="sloth_ddp", accelerator="cpu", devices=2, **QUIET)
    assert isinstance(trainer.strategy, DDPStrategy) and type(trainer.strategy).__name__ == "SlothDDPStrategy"
    assert trainer.strategy.sloth_config == sloth.SlothConfig()
    # Lightning picks the precision plugin by strategy class: the FSDP one must get FSDP's
    trainer = L.Trainer(strategy=SlothStrategy("fsdp", loss="off"), accelerator="cpu", devices=2, **QUIET)
    assert isinstance(trainer.precision_plugin, FSDPPrecision)
    assert trainer.strategy.sloth_config.loss == "off"
    with pytest.raises(ValueError, match=r"SlothStrategy\('fsdp'\) needs CUDA devices"):
        L.Trainer(strategy=SlothStrategy("fsdp"), accelerator="cpu", devices=1, max_steps=1, **QUIET).fit(TinyLoRA())
    assert isinstance(SlothStrategy("fsdp2"), ModelParallelStrategy)
    assert issubclass(StrategyRegistry["sloth_fsdp2"]["strategy"], ModelParallelStrategy)
    with pytest.raises(sloth.SlothConfigError, match="nn.Module classes"):
        SlothStrategy("fsdp2", shard_modules="LlamaDecoderLayer")


def test_fsdp1_with_lora_says_fsdp2_is_the_one_that_saves_memory():
    strategy = SlothStrategy("fsdp", verbose=False)
    strategy._lightning_module = TinyLoRA()
    strategy._sloth_pending = True
    with pytest.warns(UserWarning, match=r"FSDP1.*SlothStrategy\('fsdp2'\)"):
        strategy._sloth_patch_models()
    strategy = SlothStrategy("fsdp", verbose=False)
    strategy._lightning_module = TinyLoRA(peft=False)      # full fine-tuning: nothing frozen, no warning
    strategy._sloth_pending = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy._sloth_patch_models()


@pytest.mark.parametrize("kind", ["single", "ddp", "fsdp", "fsdp2"])
def test_a_misspelt_option_fails_at_construction_for_every_kind(kind):
    # not later, inside DDPStrategy / ModelParallelStrategy at fit() with a TypeError that lists nothing
    with pytest.raises(sloth.SlothConfigError, match=r"got unknown argument 'kernal' \(did you mean 'kernels'\?\); "
                                                     r"sloth options: kernels, loss,.*strategy options: "):
        SlothStrategy(kind, kernal=True)


def test_options_map_onto_sloth_config_and_unknown_ones_are_named():
    strategy = SlothStrategy(kernels=["rms_norm"], loss="off", gradient_checkpointing="recompute")
    assert strategy.sloth_config == sloth.SlothConfig(kernels=["rms_norm"], loss="off",
                                                      gradient_checkpointing="recompute")
    ddp = SlothStrategy("ddp", loss_chunk_size=64, find_unused_parameters=True)
    assert ddp.sloth_config.loss_chunk_size == 64 and ddp._ddp_kwargs == {"find_unused_parameters": True}
    with pytest.raises(sloth.SlothConfigError, match="kernal.*valid|sloth options: kernels"):
        SlothStrategy(kernal=True)
    with pytest.raises(sloth.SlothConfigError, match="loss must be one of chunked, off"):
        SlothStrategy("ddp", loss="fused")
    with pytest.raises(ValueError, match="kind must be one of single, ddp, fsdp, fsdp2, deepspeed"):
        SlothStrategy("megatron")
    with pytest.raises(ValueError, match="namespace must be one of"):
        SlothStrategy(namespace="lightning_fabric")
    with pytest.raises(sloth.SlothConfigError, match="checkpoint the same layers twice"):
        SlothStrategy("fsdp", gradient_checkpointing="recompute",
                      activation_checkpointing_policy={torch.nn.Linear})


def test_single_device_is_chosen_like_lightnings_auto():
    trainer = L.Trainer(strategy=SlothStrategy(), **QUIET)
    auto = L.Trainer(**QUIET)
    assert trainer.strategy.root_device == auto.strategy.root_device
    assert trainer.num_devices == 1
    explicit = L.Trainer(strategy=SlothStrategy(device="cpu"), **QUIET)
    assert explicit.strategy.root_device == torch.device("cpu")
    with pytest.warns(UserWarning, match="trains on one device.*sloth_ddp"):
        L.Trainer(strategy=SlothStrategy(), accelerator="cpu", devices=2, **QUIET)


@pytest.fixture
def lightning_info(monkeypatch):
    """Messages SlothStrategy sends to Lightning's rank_zero_info (recorded at the call: which
    logger Lightning routes them to depends on whether pytorch_lightning was imported too)."""
    import lightning.pytorch.utilities as utilities
    messages, original = [], utilities.rank_zero_info

    def record(*args, **kwargs):
        messages.append(" ".join(map(str, args)))
        return original(*args, **kwargs)

    monkeypatch.setattr(utilities, "rank_zero_info", record)
    return messages


def test_fit_matches_the_default_strategy_step_by_step(batches, lightning_info):
    ref, _ = _fit(batches, "auto", steps=6, epochs=3, accumulate_grad_batches=2)
    got, trainer = _fit(batches, SlothStrategy(), steps=6, epochs=3, accumulate_grad_batches=2)
    report = trainer.strategy.sloth_report
    assert list(trainer.strategy.sloth_reports) == ["model"]
    assert report.count("loss") == 1 and report.count("rms_norm") == 5 and report.count("rope") == 2
    assert report.count("mlp") + report.count("lora_mlp") == 2 and report.fallbacks() == {}
    assert sum("sloth_plugins patched TinyLoRA.model" in m for m in lightning_info) == 1
    assert sloth.get_state(got.model) is not None and sloth.get_state(ref.model) is None
    assert len(got.losses) == len(ref.losses) == 12
    assert got.losses == pytest.approx(ref.losses, rel=2e-5)
    ref_w, got_w = _trainable(ref), _trainable(got)
    assert ref_w.keys() == got_w.keys() and len(ref_w) == 4 * len(LORA_TARGETS)
    for name in ref_w:
        # Adam turns a tiny gradient's rounding into a visible step: ~1% of one lr-sized step allowed
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-3, atol=2e-5, msg=_named(name))


def test_patched_before_the_optimizer_and_logged_once(batches, lightning_info):
    module = TinyLoRA()
    seen = {}

    class Probe(L.Callback):
        def on_fit_start(self, trainer, pl_module):  # after strategy.setup: optimizers exist, model patched
            seen["patched"] = sloth.get_state(pl_module.model) is not None
            seen["optim_params"] = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}

    strategy = SlothStrategy()
    _, trainer = _fit(batches, strategy, steps=2, module=module, callbacks=[Probe()])
    trainer.validate(module, batches, verbose=False)  # setup runs again: patch re-asserted, not re-logged
    assert seen["patched"] and sloth.get_state(module.model) is not None
    assert seen["optim_params"] == {id(p) for p in module.parameters() if p.requires_grad}
    assert sum("sloth_plugins patched" in m for m in lightning_info) == 1
    assert strategy.sloth_report is sloth.get_state(module.model).report


def test_checkpoint_save_and_resume_continue_the_same_run(batches, tmp_path):
    ref, _ = _fit(batches, "auto", epochs=2)
    first, trainer = _fit(batches, SlothStrategy(), epochs=1)
    path = str(tmp_path / "epoch1.ckpt")
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state.keys() == TinyLoRA().state_dict().keys()  # nothing of sloth's in the checkpoint
    resumed, trainer = _fit(batches, SlothStrategy(), epochs=2, ckpt_path=path)
    assert trainer.global_step == 8 and len(resumed.losses) == 4
    assert first.losses + resumed.losses == pytest.approx(ref.losses, rel=2e-5)
    plain = TinyLoRA()
    plain.load_state_dict(state)  # a checkpoint from the patched run loads into an unpatched model
    for name, value in _trainable(plain).items():
        torch.testing.assert_close(value, _trainable(first)[name], rtol=0, atol=0, msg=_named(name))


def test_finds_models_or_says_clearly_what_it_found(batches):
    class NoHF(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            return self.net(batch["input_ids"].float()[:, :4]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(RuntimeError, match=r"found no Hugging Face causal LM in NoHF \(children: net \(Linear\)\)"):
        _fit(batches, SlothStrategy(), steps=1, module=NoHF())

    backbone = NoHF()
    backbone.body = tiny_model("llama").model  # a LlamaModel: no LM head
    with pytest.raises(RuntimeError, match=r"body \(LlamaModel: .*no language-model head"):
        _fit(batches, SlothStrategy(), steps=1, module=backbone)
    with pytest.raises(RuntimeError, match=r"model_attr='missing'.*missing, not a model"):
        _fit(batches, SlothStrategy(model_attr="missing"), steps=1, module=TinyLoRA())

    two = TinyLoRA()
    two.reference = tiny_model("llama", seed=1)  # not trained, but a causal LM: patched too
    _, trainer = _fit(batches, SlothStrategy(), steps=1, module=two)
    assert list(trainer.strategy.sloth_reports) == ["model", "reference"]
    only = TinyLoRA()
    only.reference = tiny_model("llama", seed=1)
    _, trainer = _fit(batches, SlothStrategy(model_attr="model.base_model.model"), steps=1, module=only)
    assert list(trainer.strategy.sloth_reports) == ["model.base_model.model"]
    assert sloth.get_state(only.reference) is None


def test_pytorch_lightning_namespace_works_and_wrong_namespace_is_explained(batches):
    pl = pytest.importorskip("pytorch_lightning")
    strategy = SlothStrategy(namespace="pytorch_lightning")
    assert isinstance(strategy, pl.strategies.SingleDeviceStrategy)
    assert not isinstance(strategy, SingleDeviceStrategy)
    assert isinstance(SlothStrategy("ddp", namespace="pytorch_lightning"), pl.strategies.DDPStrategy)
    assert "sloth_fsdp" in pl.strategies.StrategyRegistry.available_strategies()

    module = make_module_class(pl.LightningModule)()
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=2, **QUIET)
    trainer.fit(module, batches)
    assert len(module.losses) == 2 and sloth.get_state(module.model) is not None

    with pytest.raises(ValueError, match=r"lightning.pytorch.Trainer; with a pytorch_lightning.Trainer use "
                                         r"sloth_plugins.SlothStrategy\(..., namespace='pytorch_lightning'\)"):
        pl.Trainer(strategy=SlothStrategy(namespace="lightning"), **QUIET)
    with pytest.raises(ValueError, match=r"namespace='lightning'"):
        L.Trainer(strategy=SlothStrategy(namespace="pytorch_lightning"), **QUIET)


def test_a_pytorch_lightning_only_program_gets_pytorch_lightning_classes():
    pytest.importorskip("pytorch_lightning")
    code = ("import pickle, sys, pytorch_lightning as pl, sloth_plugins as sloth\n"
            "s = sloth.SlothStrategy('ddp')\n"
            "assert isinstance(s, pl.strategies.DDPStrategy), type(s).__mro__\n"
            "assert 'lightning.pytorch' not in sys.modules\n"
            "assert type(pickle.loads(pickle.dumps(s))) is type(s)\n"
            "t = pl.Trainer(strategy='sloth', logger=False, enable_progress_bar=False)\n"
            "print(type(t.strategy).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("PLSlothSingleDeviceStrategy")


@pytest.mark.gpu
def test_gpu_single_device_parity(batches):
    def fit(strategy):
        module = TinyLoRA()
        trainer = L.Trainer(strategy=strategy, accelerator="auto", devices=1, max_steps=6, **QUIET)
        trainer.fit(module, batches)
        return module, trainer

    ref, _ = fit("auto")
    got, trainer = fit(SlothStrategy())
    assert trainer.strategy.root_device.type == "cuda"
    assert trainer.strategy.sloth_report.device.startswith("cuda")
    assert got.losses == pytest.approx(ref.losses, rel=1e-3)


@pytest.mark.slow
def test_the_example_trains_with_fsdp2_on_two_processes(tmp_path):
    """examples/lightning_lora.py --strategy fsdp2: the sharded strategy to pick with LoRA (two CPU
    processes over gloo here; run from a folder outside the repo, as the example's users would)."""
    import os
    from pathlib import Path
    example = Path(__file__).resolve().parents[1] / "examples" / "lightning_lora.py"
    # a fresh launch: the variables Lightning's launcher sets in this process (earlier tests) would make
    # the example believe it is one of an existing group's workers and wait for the others
    launcher_vars = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK",
                     "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    proc = subprocess.run([sys.executable, str(example), "--strategy", "fsdp2", "--devices", "2", "--steps", "2",
                           "--batch-size", "4", "--seq-len", "32"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0 and "2 steps in" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
