"""padding_free=True must never change the loss silently (issue #15).

- A family outside the architecture table (OPT, GPT-2) is not proven to keep packed samples
  apart: padding_free falls back, batches stay padded, the loss is the unpatched one exactly.
- A left-padded batch: the padded model predicts the first real token of a row from the pad
  position before it; a packed row has no such position. Such batches pass through unpacked.
"""
import pytest
import torch

import sloth_plugins as sloth
from sloth_plugins.testing import tiny_model

VOCAB = 384
LENGTHS = [7, 12, 3, 9]
ONLY = dict(kernels=False, loss="off", gradient_checkpointing="off")   # padding_free alone


def _batch(side, seed=0):
    """Every token labelled (no -100 prompt): the first real token of each row is trained on.
    Padded with eos (a common pad token), whose embedding is not the zero row of padding_idx."""
    g = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    ids = torch.full((len(LENGTHS), width), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(LENGTHS):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, cols], labels[i, cols] = 1, ids[i, cols]
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _loss(model, batch):
    return model(**batch, num_items_in_batch=torch.tensor(1)).loss.detach()


def _decoder_rows(model):
    shapes = []
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])),
        with_kwargs=True)
    return shapes


def _opt():
    from transformers import AutoModelForCausalLM, OPTConfig
    return AutoModelForCausalLM.from_config(OPTConfig(
        vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        dropout=0.0, attention_dropout=0.0))


def _gpt2():
    from transformers import AutoModelForCausalLM, GPT2Config
    return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                                       n_positions=64, bos_token_id=1, eos_token_id=2,
                                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


@pytest.mark.parametrize("build", [_opt, _gpt2], ids=["opt", "gpt2"])
def test_a_family_outside_the_table_falls_back_and_keeps_the_padded_loss(build):
    torch.manual_seed(0)
    model = build().train()
    batch = _batch("right")
    ref = _loss(model, batch)
    with pytest.warns(UserWarning):                      # no architecture entry
        report = sloth.patch(model, padding_free=True, **ONLY)
    assert report.count("padding_free") == 0
    (reason,) = report.fallbacks()["padding_free"]
    assert "architecture table" in reason and "stay padded" in reason
    decoder = getattr(model, model.base_model_prefix)
    assert "forward" not in decoder.__dict__
    assert torch.equal(_loss(model, batch), ref)


def test_a_table_family_still_packs():
    model = tiny_model("llama").train()
    batch = _batch("right")
    ref = _loss(model, batch)
    report = sloth.patch(model, padding_free=True, **ONLY)
    assert report.count("padding_free") == 1 and "padding_free" not in report.fallbacks()
    rows = _decoder_rows(model)
    torch.testing.assert_close(_loss(model, batch), ref, rtol=1e-5, atol=1e-5)
    assert rows == [(1, sum(LENGTHS))]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_left_padded_batch_passes_through_with_the_padded_loss(family):
    model = tiny_model(family).train()
    batch = _batch("left")
    ref = _loss(model, batch)
    report = sloth.patch(model, padding_free=True, **ONLY)
    rows = _decoder_rows(model)
    assert torch.equal(_loss(model, batch), ref)
    assert rows == [(len(LENGTHS), max(LENGTHS))]
    notes = [n for n in report.notes if n.startswith("padding_free:")]
    assert len(notes) == 1 and "left padding" in notes[0]
    _loss(model, batch)
    assert len([n for n in report.notes if n.startswith("padding_free:")]) == 1    # noted once
