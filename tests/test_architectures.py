"""Every family in the table: tiny config from transformers, patched, same loss and grads."""
import pytest
import torch

import sloth_plugins as sloth
from sloth_plugins.testing import FAMILIES, tiny_model

EXPECTED_NORMS = {"llama": 5, "mistral": 5, "qwen2": 5, "qwen3": 9, "gemma": 5, "gemma2": 9, "gemma3_text": 13,
                  "phi3": 5}


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_patches_and_matches_unpatched(family):
    overrides = {"partial_rotary_factor": 0.5} if family == "phi3" else {}
    model = tiny_model(family, seed=1, **overrides).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=g)
    labels = ids.clone()
    labels[1, :7] = -100
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels)

    report = sloth.patch(model)
    assert report.architecture is not None
    assert report.count("rms_norm") == EXPECTED_NORMS[family]
    assert report.count("rope") == 2 and report.count("mlp") == 2 and report.count("loss") == 1
    assert not report.fallbacks(), report
    loss, grads = _loss_and_grads(model, ids, labels)

    torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=2e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert sloth.unpatch(model)


def test_phi3_partial_rotary_really_is_partial():
    model = tiny_model("phi3", partial_rotary_factor=0.5)
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 4, model.config.hidden_size)
    cos, _ = rotary(x, torch.arange(4)[None])
    assert cos.shape[-1] == model.config.hidden_size // model.config.num_attention_heads // 2
