"""Chat with a run: its adapter on the base model and the base model alone, streamed, on a tiny
model trained by a real run (the worker subprocess)."""
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sloth_plugins.studio.chat import ChatModels, prompt_text
from sloth_plugins.studio.runs import StudioError

pytestmark = pytest.mark.slow
MESSAGE = "Name a colour."


def greedy(model, tokenizer, prompt, tokens):
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_side_by_side_streams_the_adapter_and_the_base_answers(finished_run):
    manager, run_id = finished_run
    config, run_dir = manager.config(run_id), manager.run_dir(run_id)
    updates = list(ChatModels().side_by_side(run_dir, config, MESSAGE, max_new_tokens=12))
    tuned, base = updates[-1]
    assert len(updates) > 4                               # streamed: many partial answers
    assert all(b == "" for _, b in updates[:2]) and updates[0][0] != tuned    # the fine-tuned one grows first
    # the same greedy answers as plain transformers / PEFT, without the streamer
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    prompt = prompt_text(MESSAGE, config["dataset"]["mapping"], tokenizer)
    assert prompt.startswith("### Instruction:\nName a colour.")   # as the Alpaca run was trained
    plain = AutoModelForCausalLM.from_pretrained(config["model"]).eval()
    assert base == greedy(plain, tokenizer, prompt, 12)
    tuned_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["model"]),
                                            os.path.join(run_dir, "adapter")).eval()
    assert tuned == greedy(tuned_model, tokenizer, prompt, 12)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():   # the adapter changed the model
        assert not torch.allclose(tuned_model(**ids).logits, plain(**ids).logits, atol=1e-3)


def test_sampling_options_reach_generate(finished_run):
    manager, run_id = finished_run
    chat = ChatModels().get(manager.run_dir(run_id), manager.config(run_id))
    answers = set()
    for seed in range(3):
        torch.manual_seed(seed)
        *_, answer = chat.stream(MESSAGE, temperature=1.5, top_p=0.95, max_new_tokens=8)
        answers.add(answer)
    assert len(answers) > 1            # sampled, not greedy
    *_, short = chat.stream(MESSAGE, max_new_tokens=3)
    prompt = prompt_text(MESSAGE, chat.mapping, chat.tokenizer)
    assert short == greedy(chat.model, chat.tokenizer, prompt, 3) != greedy(chat.model, chat.tokenizer, prompt, 12)


def test_run_without_adapter_is_refused(tmp_path, finished_run):
    manager, run_id = finished_run
    with pytest.raises(StudioError, match="no adapter yet"):
        ChatModels().get(str(tmp_path), manager.config(run_id))
    with pytest.raises(StudioError, match="full fine-tune"):
        ChatModels().get(manager.run_dir(run_id), {**manager.config(run_id), "method": "full"})
