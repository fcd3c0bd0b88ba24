"""TRL's preference, RL, reward and distillation trainers + SlothCallback, fp32 on tiny models.

Each trainer runs 10 optimizer steps (gradient accumulation 2, plain SGD: Adam would turn 1e-7
gradient noise on near-zero elements into lr-sized steps) twice, without and with the callback:
every micro-batch loss, every logged metric of the trainer (rewards, margins, KL, log-probs,
entropy, grad norm) and the gradient of every optimizer step must agree. The report must say who
computes the loss: TRL's own head or code, never sloth's chunked loss (it is off for these trainers).

Trainers a TRL version lacks are skipped (TRL 1.9, the Axolotl environment, has no
DistillationTrainer; its DPO/KTO/GRPO/RLOO read full logits instead of a fused head).
"""
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, TrainerCallback

import sloth_plugins as sloth
from sloth_plugins import testing

trl = pytest.importorskip("trl")

STEPS, ACCUMULATION, REL = 10, 2, 2e-5
# Keys of the logs that are not the trainer's numbers (or are rounded by the Trainer: the micro
# losses are compared at full precision instead).
NOT_COMPARED = ("loss", "epoch", "learning_rate", "num_tokens", "train_runtime")


@pytest.fixture(scope="module")
def tokenizer():
    return testing.train_tokenizer(testing.format_example(r) for r in testing.load_instructions())


@pytest.fixture(scope="module")
def rows():
    return testing.load_instructions()


def _prompt(row):
    return f"### Instruction:\n{row['instruction']}\n### Response:\n"


def _model_kw(tokenizer):
    return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)


class GradientRecorder(TrainerCallback):
    """The flattened gradient of the trainable parameters before each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(torch.cat([p.grad.detach().flatten().clone() if p.grad is not None
                                     else p.new_zeros(p.numel()) for p in model.parameters() if p.requires_grad]).float().cpu())


class Run:
    def __init__(self, trainer, grads, callback):
        self.trainer, self.grads, self.callback = trainer, grads.grads, callback
        self.micro_losses = trainer.micro_losses
        self.logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]

    @property
    def report(self):
        return self.callback.report


def _train(trainer_cls, config_cls, patched, tmp_path, *, sloth_options=None, gpu=False, **kwargs):
    recorder_cls = type(f"Recording{trainer_cls.__name__}", (testing.MicroLossRecorder, trainer_cls), {})
    config_kw = kwargs.pop("config")
    args = config_cls(output_dir=str(tmp_path / f"{trainer_cls.__name__}-{patched}"), max_steps=STEPS,
                      gradient_accumulation_steps=ACCUMULATION, optim="sgd", learning_rate=config_kw.pop("lr", 1e-2),
                      lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=not gpu,
                      bf16=gpu, seed=0, disable_tqdm=True, **config_kw)
    grads = GradientRecorder()
    callback = sloth.SlothCallback(verbose=False, **(sloth_options or {})) if patched else None
    trainer = recorder_cls(args=args, callbacks=[grads] + ([callback] if callback else []), **kwargs)
    trainer.train()
    return Run(trainer, grads, callback)


def _assert_same_training(ref: Run, run: Run, floors=None):
    """Micro losses, logged metrics and gradients equal to REL. ``floors``: key prefix -> function of a
    log row giving the magnitude the metric is computed from (a DPO reward is beta * a difference of
    log-probs of ~100: its error is relative to those, not to itself)."""
    assert len(run.micro_losses) == len(ref.micro_losses) == STEPS * ACCUMULATION
    assert run.micro_losses == pytest.approx(ref.micro_losses, rel=REL, abs=1e-7)
    assert len(run.grads) == len(ref.grads) == STEPS
    for step, (got, want) in enumerate(zip(run.grads, ref.grads)):
        assert want.norm() > 0, f"step {step}: the reference run got no gradient"
        err = ((got - want).norm() / want.norm()).item()
        assert err <= REL, f"step {step}: gradient differs by {err:.3g} (relative norm)"
    assert len(run.logs) == len(ref.logs) == STEPS
    compared = set()
    for step, (got, want) in enumerate(zip(run.logs, ref.logs)):
        for key, value in want.items():
            if (key in NOT_COMPARED or not isinstance(value, (int, float)) or key.startswith("sloth/")
                    or "time" in key):
                continue
            floor = next((f(want) for prefix, f in (floors or {}).items() if key.startswith(prefix)), 0.0)
            tol = REL * max(abs(value), floor) + 1e-7
            assert key in got and abs(got[key] - value) <= tol, (step, key, got.get(key), value)
            compared.add(key)
    return compared


def _loss_owner(report, trainer):
    """The report names the TRL trainer as the loss's owner and claims no sloth loss."""
    assert report.count("loss") == 0
    notes = " ".join(report.notes)
    assert f"TRL {trainer}" in notes and "sloth's chunked loss is off" in notes, notes
    return notes


def _fused_head():
    from trl.trainer import dpo_trainer
    return hasattr(dpo_trainer, "add_fused_lm_head")


# ---- DPO ----------------------------------------------------------------------------------------

def _dpo_data(rows):
    return Dataset.from_list([dict(prompt=_prompt(r), chosen=r["response"],
                                   rejected=rows[(i + 7) % len(rows)]["response"]) for i, r in enumerate(rows[:40])])


def _dpo(tokenizer, rows, tmp_path, patched, reference, gpu=False):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    model = testing.tiny_model("llama", **_model_kw(tokenizer))
    ref_model = peft_config = None
    if reference == "disabled_adapter":     # TRL adds the adapter; the reference is the model with it disabled
        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    elif reference == "ref_adapter":        # an existing adapter: TRL keeps a copy of it as the "ref" adapter
        model = testing.with_lora(model)
    else:
        ref_model = testing.tiny_model("llama", seed=1, **_model_kw(tokenizer))
    # padding-free on one of the three: the chosen/rejected rows are right-padded, packed inside the decoder
    options = {"padding_free": True} if reference == "ref_adapter" else None
    return _train(DPOTrainer, DPOConfig, patched, tmp_path, sloth_options=options, gpu=gpu, model=model,
                  ref_model=ref_model,
                  peft_config=peft_config,
                  train_dataset=_dpo_data(rows), processing_class=tokenizer,
                  config=dict(per_device_train_batch_size=2, max_length=64, beta=0.1, gradient_checkpointing=True))


def _dpo_floors(beta):
    return {"rewards/": lambda row: beta * max(abs(row["logps/chosen"]), abs(row["logps/rejected"]))}


@pytest.mark.parametrize("reference", ["disabled_adapter", "ref_adapter", "ref_model"])
def test_dpo(tokenizer, rows, tmp_path, reference):
    peft = reference != "ref_model"
    ref = _dpo(tokenizer, rows, tmp_path, False, reference)
    run = _dpo(tokenizer, rows, tmp_path, True, reference)
    keys = _assert_same_training(ref, run, _dpo_floors(0.1))
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm"} <= keys
    assert any(abs(log["rewards/margins"]) > 0 for log in ref.logs)
    notes = _loss_owner(run.report, "DPOTrainer")
    assert ("add_fused_lm_head" in notes) == _fused_head()
    assert run.report.count("lora_mlp" if peft else "mlp") == 2 and run.report.count("rms_norm") == 5
    assert run.report.count("gradient_checkpointing") == 2
    if reference == "ref_adapter":
        assert run.report.count("padding_free") == 1
        assert not [n for n in run.report.notes if n.startswith("padding_free")], run.report.notes


# ---- Reward model -------------------------------------------------------------------------------

def _reward(tokenizer, rows, tmp_path, patched):
    from trl import RewardConfig, RewardTrainer
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(testing.tiny_config("llama", num_labels=1, **_model_kw(tokenizer)))
    data = Dataset.from_list([dict(chosen=testing.format_example(r), rejected=_prompt(r) + rows[(i + 5) % len(rows)]["response"])
                              for i, r in enumerate(rows[:40])])
    return _train(RewardTrainer, RewardConfig, patched, tmp_path, model=model, train_dataset=data,
                  processing_class=tokenizer, config=dict(per_device_train_batch_size=2, max_length=64,
                                                          gradient_checkpointing=True))


def test_reward_model(tokenizer, rows, tmp_path):
    ref = _reward(tokenizer, rows, tmp_path, False)
    run = _reward(tokenizer, rows, tmp_path, True)
    keys = _assert_same_training(ref, run)
    assert "grad_norm" in keys
    report = run.report
    _loss_owner(report, "RewardTrainer")
    # the sequence-classification model is patched like a causal LM's decoder
    assert report.count("rms_norm") == 5 and report.count("rope") == 2 and report.count("mlp") == 2
    assert report.count("gradient_checkpointing") == 2


def test_patch_sequence_classification_model_directly():
    """Outside TRL, the loss plugin stands aside for a model without an LM head and says why."""
    model = AutoModelForSequenceClassification.from_config(testing.tiny_config("llama", num_labels=1))
    report = sloth.patch(model)
    (loss,) = [e for e in report.entries if e.kind == "loss"]
    assert not loss.patched and "no language-model head" in loss.detail and "score" in loss.detail
    ids = torch.randint(3, 300, (2, 12))
    patched = model(input_ids=ids).logits
    sloth.unpatch(model)
    torch.testing.assert_close(patched, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


# ---- KTO ----------------------------------------------------------------------------------------

def _kto(tokenizer, rows, tmp_path, patched):
    from trl import KTOConfig, KTOTrainer
    model = testing.with_lora(testing.tiny_model("llama", **_model_kw(tokenizer)))
    data = Dataset.from_list([dict(prompt=_prompt(r), completion=rows[(i + 3 * (i % 2)) % len(rows)]["response"],
                                   label=i % 2 == 0) for i, r in enumerate(rows[:40])])
    return _train(KTOTrainer, KTOConfig, patched, tmp_path, model=model, train_dataset=data,
                  processing_class=tokenizer,
                  config=dict(per_device_train_batch_size=4, max_length=64, beta=0.1, gradient_checkpointing=True))


def test_kto(tokenizer, rows, tmp_path):
    ref = _kto(tokenizer, rows, tmp_path, False)
    run = _kto(tokenizer, rows, tmp_path, True)
    logps = ("logps/chosen", "logps/rejected")
    keys = _assert_same_training(ref, run, {"rewards/": lambda row: 0.1 * max(abs(row.get(k, 0)) for k in logps),
                                            "kl": lambda row: 0.1 * max(abs(row.get(k, 0)) for k in logps)})
    assert "kl" in keys and "grad_norm" in keys
    _loss_owner(run.report, "KTOTrainer")


# ---- GRPO / RLOO: generation with transformers' generate, a python reward ---------------------------

def _reward_vowels(completions, **kwargs):
    """A reward with a spread: the share of vowels in each completion."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def _online(trainer_name, tokenizer, rows, tmp_path, patched, sloth_options=None, gpu=False):
    config_cls, trainer_cls = getattr(trl, trainer_name + "Config"), getattr(trl, trainer_name + "Trainer")
    model = testing.with_lora(testing.tiny_model("llama", **_model_kw(tokenizer)))      # the reference: the adapter disabled
    data = Dataset.from_list([dict(prompt=_prompt(r)) for r in rows[:40]])
    return _train(trainer_cls, config_cls, patched, tmp_path, sloth_options=sloth_options, gpu=gpu, model=model,
                  reward_funcs=_reward_vowels, train_dataset=data, processing_class=tokenizer,
                  config=dict(per_device_train_batch_size=2, num_generations=2, max_completion_length=6, beta=0.04,
                              gradient_checkpointing=True, lr=1e-1))


@pytest.mark.parametrize("name", ["GRPO", "RLOO"])
def test_grpo_and_rloo(tokenizer, rows, tmp_path, name):
    ref = _online(name, tokenizer, rows, tmp_path, False)
    # padding-free on: a batch is prompt (left-padded for generation) + completion (right-padded); left-padded
    # batches stay padded (a note says so), others are packed, with the same log-probs either way
    run = _online(name, tokenizer, rows, tmp_path, True, sloth_options={"padding_free": True})
    # same completions (sampled from the same RNG state on models that agree), same rewards
    keys = _assert_same_training(ref, run, {"kl": lambda row: 1e-2})
    assert {"reward", "kl", "grad_norm"} <= keys
    assert any(log["kl"] > 0 for log in ref.logs[1:])
    assert run.report.count("padding_free") == 1
    notes = _loss_owner(run.report, name + "Trainer")
    assert ("add_fused_lm_head" in notes) == _fused_head()


def test_greedy_generate_of_a_patched_model_is_unchanged(tokenizer, rows):
    """GRPO/RLOO generate with the training model (train mode, no grad): greedy tokens must not move."""
    model = testing.with_lora(testing.tiny_model("llama", **_model_kw(tokenizer)))
    batch = tokenizer([_prompt(r) for r in rows[:4]], return_tensors="pt", padding=True, padding_side="left")
    model.train()

    def generate():
        with torch.no_grad():
            return model.generate(**batch, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)

    want = generate()
    model.gradient_checkpointing_enable()
    report = sloth.patch(model, sloth.SlothConfig(padding_free=True))
    assert report.count("lora_mlp") == 2 and report.count("loss") == 1
    assert torch.equal(generate(), want)


# ---- Distillation (TRL >= 1.16: on-policy, the student generates; generalized JSD against a teacher) ----

def _distill(tokenizer, rows, tmp_path, patched):
    config_cls, trainer_cls = trl.DistillationConfig, trl.DistillationTrainer
    student = testing.with_lora(testing.tiny_model("llama", **_model_kw(tokenizer)))
    teacher = testing.tiny_model("llama", seed=3, **_model_kw(tokenizer))
    data = Dataset.from_list([dict(prompt=_prompt(r)) for r in rows[:40]])
    return _train(trainer_cls, config_cls, patched, tmp_path, model=student, teacher_model=teacher,
                  train_dataset=data, processing_class=tokenizer,
                  config=dict(per_device_train_batch_size=2, max_completion_length=6, gradient_checkpointing=True,
                              lr=1e-1))


@pytest.mark.skipif(not hasattr(trl, "DistillationTrainer"), reason="this TRL has no DistillationTrainer (< 1.16)")
def test_distillation(tokenizer, rows, tmp_path):
    ref = _distill(tokenizer, rows, tmp_path, False)
    run = _distill(tokenizer, rows, tmp_path, True)
    keys = _assert_same_training(ref, run)
    assert "grad_norm" in keys
    _loss_owner(run.report, "DistillationTrainer")


# ---- GPU (the H200: Triton kernels, bf16 autocast) ----------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["DPO", "GRPO"])
def test_gpu_dpo_and_grpo_bf16(tokenizer, rows, tmp_path, name):
    """The same runs on CUDA under bf16 autocast, sloth's Triton kernels in: losses and gradients agree
    to bf16 accuracy (GRPO samples: its completions may part ways once logits differ in the last bit,
    so only the first step's gradient and the first micro losses are held tight)."""
    if name == "DPO":
        ref = _dpo(tokenizer, rows, tmp_path, False, "disabled_adapter", gpu=True)
        run = _dpo(tokenizer, rows, tmp_path, True, "disabled_adapter", gpu=True)
        steps = STEPS
    else:
        ref = _online("GRPO", tokenizer, rows, tmp_path, False, gpu=True)
        run = _online("GRPO", tokenizer, rows, tmp_path, True, gpu=True)
        steps = 1
    assert "Triton" not in " ".join(run.report.fallbacks().get("rms_norm", []))
    assert run.micro_losses[:2 * steps] == pytest.approx(ref.micro_losses[:2 * steps], rel=2e-2, abs=1e-3)
    for got, want in zip(run.grads[:steps], ref.grads[:steps]):
        assert ((got - want).norm() / want.norm()).item() <= 5e-2
