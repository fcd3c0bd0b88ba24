"""Issue 21: sloth in each framework's own conventions — metrics in the user's tracker, decisions
announced through logging, no silent clashes, output fields that name the option, names that agree."""
import copy
import dataclasses
import logging
import pickle
import warnings

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

import sloth_plugins as sloth
from sloth_plugins.testing import format_example, load_instructions, tiny_model, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(format_example(r) for r in load_instructions())


@pytest.fixture(scope="module")
def dataset(tokenizer):
    from datasets import Dataset
    texts = [format_example(r) for r in load_instructions(limit=32)]
    return Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"], truncation=True, max_length=32),
                                                  batched=True, remove_columns=["text"])


def _model(tokenizer, family="llama"):
    return tiny_model(family, seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _args(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                   save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    return TrainingArguments(**{**options, **overrides})


def _trainer(tokenizer, dataset, args, callback, model=None):
    return Trainer(model=model or _model(tokenizer), args=args, train_dataset=dataset, callbacks=[callback],
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# ---- 1. metrics in the user's tracker -------------------------------------------------------------------------
def test_metrics_reach_tensorboard(tokenizer, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    callback = sloth.SlothCallback(verbose=False, gradient_checkpointing="recompute")
    trainer = _trainer(tokenizer, dataset, _args(tmp_path, report_to=["tensorboard"]), callback)
    trainer.train()
    acc = _events(tmp_path / "tb")
    scalars = acc.Tags()["scalars"]
    tokens = [e.value for e in acc.Scalars("train/sloth/tokens_per_s")]
    assert len(tokens) == 2 and all(v > 0 for v in tokens)
    layers = trainer.model.config.num_hidden_layers
    assert [e.value for e in acc.Scalars("train/sloth/checkpoint_recomputed_layers")] == [layers, layers]
    assert [e.value for e in acc.Scalars("train/sloth/checkpoint_kept_layers")] == [0, 0]
    assert [e.value for e in acc.Scalars("train/sloth/checkpoint_offloaded_layers")] == [0, 0]
    assert "train/sloth/peak_memory_gib" not in scalars      # no CUDA: no peak to report
    texts = acc.Tensors("train/sloth/patch_report/text_summary")
    assert len(texts) == 1                                   # once: the report did not change
    text = texts[0].tensor_proto.string_val[0].decode()
    assert text == str(callback.report) and "PatchReport" in text


def test_tokens_per_s_counts_the_training_tokens(tokenizer, dataset, tmp_path):
    callback = sloth.SlothCallback(verbose=False)
    trainer = _trainer(tokenizer, dataset, _args(tmp_path, max_steps=1), callback)
    seen = []
    trainer.add_callback(type("Seen", (__import__("transformers").TrainerCallback,),
                              {"on_log": lambda self, args, state, control, logs=None, **kw: seen.append(dict(logs))}))
    trainer.train()
    assert "sloth/tokens_per_s" in seen[0] and "sloth/patch_report" in seen[0]
    assert all("sloth/tokens_per_s" not in logs for logs in seen[1:])   # the train summary: no interval


# ---- 2. decisions are announced through logging ---------------------------------------------------------------
def test_report_goes_to_logging_not_stdout(tokenizer, dataset, tmp_path, capsys, caplog):
    callback = sloth.SlothCallback()           # verbose=True
    with caplog.at_level(logging.INFO, logger="sloth_plugins"):
        _trainer(tokenizer, dataset, _args(tmp_path, max_steps=1), callback).train()
    # not printed; the Trainer's console logger shows the logs dict, the report text inside it once
    assert not any(line.startswith("sloth_plugins PatchReport") for line in capsys.readouterr().out.splitlines())
    assert [r.getMessage() for r in caplog.records
            if r.name == "sloth_plugins" and "PatchReport" in r.getMessage()] == [str(callback.report)]
    assert logging.getLogger("sloth_plugins").getEffectiveLevel() <= logging.INFO   # seen by default


def test_auto_keeping_every_layer_is_announced(tokenizer, dataset, tmp_path, caplog):
    callback = sloth.SlothCallback(verbose=False, gradient_checkpointing="auto", memory_budget_gb=64)
    trainer = _trainer(tokenizer, dataset, _args(tmp_path, max_steps=3, gradient_checkpointing=True), callback)
    before = str(callback.report)
    with caplog.at_level(logging.INFO, logger="sloth_plugins"):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("keeps all" in m and "gradient checkpointing is enabled" in m for m in messages), messages
    controller = sloth.get_checkpoint_controller(trainer.model)
    assert set(controller.decisions) == {"keep"}
    # the callback's report is the live one: the plan revised it
    assert "auto plan" in str(callback.report) and str(callback.report) != before


def test_auto_offloading_is_announced_and_the_refreshed_report_is_in_trainer_state(tokenizer, dataset, tmp_path,
                                                                                   caplog):
    callback = sloth.SlothCallback(verbose=False, gradient_checkpointing="auto", memory_budget_gb=1e-9)
    model = tiny_model("llama", seed=0, layers=4, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    trainer = _trainer(tokenizer, dataset, _args(tmp_path, max_steps=3, gradient_checkpointing=True), callback,
                       model=model)
    with caplog.at_level(logging.INFO, logger="sloth_plugins"):
        trainer.train()
    offloads = [r for r in caplog.records if r.levelno == logging.INFO and "auto offloads the inputs" in r.getMessage()]
    assert len(offloads) >= 1, [r.getMessage() for r in caplog.records]
    controller = sloth.get_checkpoint_controller(trainer.model)
    assert "offload" in controller.decisions
    assert f"{controller.decisions.count('offload')} of {len(controller.decisions)} layers" in offloads[-1].getMessage()
    # reachable from the trainer: the callback's live report, and each version of it in trainer.state
    reports = [h["sloth/patch_report"] for h in trainer.state.log_history if "sloth/patch_report" in h]
    assert reports[-1] == str(callback.report), (reports[-1], str(callback.report))
    assert "auto plan" in reports[-1] and "offload" in reports[-1]
    assert [h["sloth/checkpoint_offloaded_layers"] for h in trainer.state.log_history
            if "sloth/checkpoint_offloaded_layers" in h][-1] == controller.decisions.count("offload")


# ---- Lightning: the same metrics through the LightningModule's logger -------------------------------------------
def test_lightning_metrics_reach_the_csv_logger(tokenizer, tmp_path):
    L = pytest.importorskip("lightning")
    import csv

    import yaml
    from lightning.pytorch.loggers import CSVLogger

    from sloth_plugins.integrations.lightning import SlothStrategy

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _model(tokenizer)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    texts = [format_example(r) for r in load_instructions(limit=8)]
    enc = tokenizer(texts, truncation=True, max_length=32, padding="longest", return_tensors="pt")
    rows = [dict(input_ids=enc["input_ids"][i], attention_mask=enc["attention_mask"][i],
                 labels=enc["input_ids"][i].masked_fill(enc["attention_mask"][i] == 0, -100)) for i in range(8)]
    strategy = SlothStrategy(gradient_checkpointing="recompute", verbose=False)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=2, log_every_n_steps=1,
                        logger=CSVLogger(str(tmp_path), name="run"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), torch.utils.data.DataLoader(rows, batch_size=4))
    folder = trainer.logger.log_dir
    with open(f"{folder}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sloth/tokens_per_s")]
    assert len(rows) == 2 and all(float(r["sloth/tokens_per_s"]) > 0 for r in rows)
    assert [float(r["sloth/checkpoint_recomputed_layers"]) for r in rows] == [2.0, 2.0]
    assert "sloth/peak_memory_gib" not in rows[0]      # CPU: no CUDA peak to report
    with open(f"{folder}/hparams.yaml") as f:
        assert yaml.safe_load(f)["sloth/patch_report"] == str(strategy.sloth_report)
    import pickle
    callback = next(c for c in trainer.callbacks if type(c).__name__.startswith("_SlothMetrics"))
    assert pickle.loads(pickle.dumps(type(callback))) is type(callback)   # by name: ddp_spawn pickles the Trainer


# ---- 6. names agree ---------------------------------------------------------------------------------------------
def test_activation_checkpointing_is_an_alias_of_gradient_checkpointing():
    assert sloth.SlothConfig(activation_checkpointing="offload").gradient_checkpointing == "offload"
    assert sloth.SlothConfig().replace(activation_checkpointing="off").gradient_checkpointing == "off"
    assert sloth.SlothConfig(activation_checkpointing="off", gradient_checkpointing="off").gradient_checkpointing == "off"
    with pytest.raises(sloth.SlothConfigError, match="alias of gradient_checkpointing"):
        sloth.SlothConfig(activation_checkpointing="off", gradient_checkpointing="recompute")
    with pytest.raises(sloth.SlothConfigError, match="gradient_checkpointing must be one of"):
        sloth.SlothConfig(activation_checkpointing="sometimes")
    assert sloth.SlothCallback(activation_checkpointing="recompute").config.gradient_checkpointing == "recompute"


def test_lightning_strategy_takes_the_alias():
    pytest.importorskip("lightning")
    from sloth_plugins.integrations.lightning import SlothStrategy
    assert SlothStrategy(activation_checkpointing="off").sloth_config.gradient_checkpointing == "off"
    assert SlothStrategy("ddp", activation_checkpointing="off").sloth_config.gradient_checkpointing == "off"


# ---- 3. no silent clashes -------------------------------------------------------------------------------------
def test_liger_in_training_arguments_is_refused_naming_both(tokenizer, dataset, tmp_path):
    with pytest.raises(sloth.SlothConfigError, match=r"TrainingArguments\(use_liger_kernel=True\) and SlothCallback"):
        _trainer(tokenizer, dataset, _args(tmp_path, use_liger_kernel=True), sloth.SlothCallback(verbose=False))
    # sloth's checkpointing alone patches nothing Liger patches
    callback = sloth.SlothCallback(verbose=False, kernels=False, loss="off")
    _trainer(tokenizer, dataset, _args(tmp_path, use_liger_kernel=True), callback)
    assert callback.report.count("gradient_checkpointing") > 0


def test_liger_in_sft_config_is_refused_naming_both(tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    ds = Dataset.from_dict({"text": [format_example(r) for r in load_instructions(limit=8)]})
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, report_to=[], use_cpu=True, max_length=32,
                     dataset_text_field="text", use_liger_kernel=True)
    with pytest.raises(sloth.SlothConfigError, match=r"SFTConfig\(use_liger_kernel=True\) and SlothCallback"):
        SFTTrainer(model=_model(tokenizer), args=args, train_dataset=ds, processing_class=tokenizer,
                   callbacks=[sloth.SlothCallback(verbose=False)])
    # TRL turns Liger's loss off: only sloth's kernels clash
    SFTTrainer(model=_model(tokenizer), args=args, train_dataset=ds, processing_class=tokenizer,
               callbacks=[sloth.SlothCallback(verbose=False, kernels=False)])


def test_a_model_unsloth_patched_is_refused(tokenizer, dataset, tmp_path):
    # Unsloth's FastLanguageModel rebinds the classes' forwards to functions of its own modules;
    # a class whose forward lives in a module named unsloth.* is what the callback sees then.
    model = _model(tokenizer)
    layer_class = type(model.model.layers[0])

    def forward(self, *args, **kwargs):
        return layer_class.forward(self, *args, **kwargs)
    forward.__module__ = "unsloth.models.llama"
    for layer in model.model.layers:
        layer.__class__ = type(layer_class.__name__, (layer_class,), {"forward": forward})
    with pytest.raises(sloth.SlothConfigError, match="already patched by Unsloth"):
        _trainer(tokenizer, dataset, _args(tmp_path), sloth.SlothCallback(verbose=False), model=model)


def test_lightning_strategy_names_resolve_after_the_documented_import():
    pytest.importorskip("lightning")
    import subprocess
    import sys
    code = ("import sloth_plugins, lightning.pytorch.strategies as s; r = s.StrategyRegistry; "
            "before = 'sloth' in r; import sloth_plugins.integrations.lightning; "
            "print(before, all(n in r for n in ('sloth', 'sloth_ddp', 'sloth_fsdp', 'sloth_fsdp2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    # a plain `import sloth_plugins` imports no framework (README: the exact import to register them)
    assert out.stdout.split() == ["False", "True"], out.stderr[-2000:]


# ---- outputs.logits under the chunked loss names the option ---------------------------------------------------
@pytest.fixture
def logits_warning_armed():
    from sloth_plugins.plugins import loss
    loss._warned_no_logits.clear()
    yield
    loss._warned_no_logits.clear()


def _chunked_output(tokenizer):
    model = _model(tokenizer)
    sloth.patch(model, sloth.SlothConfig())
    model.train()
    ids = torch.randint(0, len(tokenizer), (2, 8))
    return model(input_ids=ids, labels=ids)


def test_reading_logits_in_a_training_step_warns_naming_return_logits(tokenizer, logits_warning_armed):
    out = _chunked_output(tokenizer)
    with pytest.warns(UserWarning, match=r"SlothConfig\(return_logits=True\)"):
        assert out.logits is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert out.logits is None                      # once
    # otherwise the output answers as transformers' own with logits None
    assert list(out.keys()) == ["loss"] and out.to_tuple() == (out.loss,) and out[0] is out.loss
    assert isinstance(out, CausalLMOutputWithPast) and hasattr(out, "logits")


def test_framework_copies_of_the_output_do_not_warn(tokenizer, logits_warning_armed):
    """FSDP1 / FSDP2 copy a forward's output field by field (torch.distributed.utils._apply_to_tensors), as
    do dataclasses.replace, copy and pickle: none of them is the user reading logits."""
    from torch.distributed.utils import _apply_to_tensors
    with torch.no_grad():                               # (deepcopy and pickle take graph leaves only)
        out = _chunked_output(tokenizer)
    assert type(out).__name__ == "SlothCausalLMOutputWithPast", "the chunked loss ran"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copied = _apply_to_tensors(lambda t: t * 1, out)
        for dup in (copied, dataclasses.replace(out), copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
            assert type(dup) is type(out) and torch.equal(dup.loss, out.loss)
            assert dup.__dict__.get("logits") is None and list(dup.keys()) == ["loss"]
