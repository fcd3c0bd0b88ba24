"""Lightning has no DPO trainer: users compute the preference loss in ``training_step``. Under SlothStrategy the
kernels, fused LoRA and checkpointing apply; sloth's chunked loss does not (no labels reach the model), so the
logits stay real and the DPO loss per step equals the one under Lightning's default strategy."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")
from peft import LoraConfig, get_peft_model  # noqa: E402

import sloth_plugins as sloth  # noqa: E402
from sloth_plugins.integrations.lightning import SlothStrategy  # noqa: E402
from sloth_plugins.testing import tiny_model, train_tokenizer  # noqa: E402

PAIRS = [json.loads(line) for line in (Path(__file__).parent / "data" / "tiny_dpo.jsonl").read_text().splitlines()]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def batches():
    """8 preference pairs, 2 a batch: prompt+chosen and prompt+rejected, completion tokens marked."""
    tokenizer = train_tokenizer(p["prompt"] + p[k] for p in PAIRS for k in ("chosen", "rejected"))
    rows = []
    for pair in PAIRS[:8]:
        prompt = len(tokenizer(pair["prompt"])["input_ids"])
        row = {}
        for key in ("chosen", "rejected"):
            ids = tokenizer(pair["prompt"] + pair[key])["input_ids"]
            row[key] = ids
            row[key + "_start"] = prompt
        rows.append(row)
    width = max(len(r[k]) for r in rows for k in ("chosen", "rejected"))

    def collate(items):
        out = {}
        for key in ("chosen", "rejected"):
            ids = torch.zeros(len(items), width, dtype=torch.long)
            attention, completion = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
            for i, item in enumerate(items):
                n = len(item[key])
                ids[i, :n], attention[i, :n] = torch.tensor(item[key]), 1
                completion[i, item[key + "_start"]:n] = True
            out[key] = dict(input_ids=ids, attention_mask=attention, completion=completion)
        return out

    return torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=collate)


def sequence_logps(model, part):
    """Sum of the completion tokens' log-probs, from the model's full logits (no labels passed)."""
    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    assert logits is not None and logits.shape[-1] == 384      # real logits: sloth's loss is not in the way
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, part["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * part["completion"][:, 1:]).sum(-1)


class TinyDPO(L.LightningModule):
    def __init__(self, beta=0.1):
        super().__init__()
        model = tiny_model("llama", seed=0, vocab_size=384)
        model.config.use_cache = False
        self.model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
        self.beta, self.losses = beta, []

    def training_step(self, batch, batch_idx):
        policy = {k: sequence_logps(self.model, batch[k]) for k in ("chosen", "rejected")}
        with torch.no_grad(), self.model.disable_adapter():     # the reference: the base model, adapter off
            ref = {k: sequence_logps(self.model, batch[k]) for k in ("chosen", "rejected")}
        margin = (policy["chosen"] - ref["chosen"]) - (policy["rejected"] - ref["rejected"])
        loss = -F.logsigmoid(self.beta * margin).mean()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=5e-3)


def _fit(batches, strategy, **trainer_kw):
    module = TinyDPO()
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=4, **{**QUIET, **trainer_kw})
    trainer.fit(module, batches)
    return module, trainer


def test_dpo_in_training_step_matches_the_default_strategy(batches):
    ref, _ = _fit(batches, "auto")
    got, trainer = _fit(batches, SlothStrategy(verbose=False))
    report = trainer.strategy.sloth_report
    assert report.count("rms_norm") == 5 and report.count("rope") == 2
    # the report tells the user that their training_step, not sloth, computes the loss from the full logits
    assert list(report.fallbacks()) == ["loss"], str(report)
    assert "a training forward ran without labels" in report.fallbacks()["loss"][0]
    assert report.count("mlp") + report.count("lora_mlp") == 2 and report.count("gradient_checkpointing") == 2
    assert sloth.get_state(got.model) is not None and sloth.get_state(ref.model) is None
    assert len(got.losses) == len(ref.losses) == 4
    assert len(set(ref.losses)) > 1 and abs(ref.losses[0] - 0.6931) < 1e-3   # log 2 at the start, then it moves
    assert got.losses == pytest.approx(ref.losses, rel=2e-5)
