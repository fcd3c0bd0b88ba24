"""patch(base), wrap it with PEFT, patch(peft_model) again: the second patch must see the LoRA layers.

Idempotency (same config -> same report) holds only while the module tree is the one patched;
after PEFT replaced the projections the old patches are undone exactly and the model patched afresh.
"""
import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

import sloth_plugins as sloth  # noqa: E402
from sloth_plugins.models import resolve_causal_lm  # noqa: E402
from sloth_plugins.testing import tiny_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]


def lora(model, seed=1):
    torch.manual_seed(seed)
    targets = [t for t in TARGETS if any(n.endswith("." + t) for n, _ in model.named_modules())]
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=targets))


def loss_and_grads(model):
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _instance_state(model):
    return {(name, key): value for name, module in model.named_modules() for key, value in module.__dict__.items()}


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_patch_then_peft_then_patch_applies_fused_lora(family):
    base = tiny_model(family)
    first = sloth.patch(base)
    assert not any(e.kind.startswith("lora_") for e in first.entries)
    model = lora(base)
    pristine = _instance_state(model)     # still carrying the first patch's attributes

    report = sloth.patch(model)
    assert report is not first and sloth.get_state(model).report is report
    for kind in ("lora_mlp", "lora_qkv", "lora_o"):
        assert report.count(kind) > 0, (kind, str(report))
    assert not report.fallbacks(), str(report)
    assert sloth.patch(model) is report, "same model, same config: idempotent again"

    ref = lora(tiny_model(family))
    ref.load_state_dict(model.state_dict())
    want_loss, want_grads = loss_and_grads(ref)
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=3e-6)

    # the first patch was undone exactly: unpatching now leaves an unpatched PEFT model
    assert sloth.unpatch(model)
    # PEFT added an input-grad hook when it wrapped the patched model, whose layers' checkpointing flags read true
    after = {k: v for k, v in _instance_state(model).items() if not k[1].startswith("_require_grads_hook")}
    control = _instance_state(ref)
    assert after.keys() == control.keys()
    assert after.keys() <= pristine.keys() and all(after[k] is pristine[k] for k in after)
    assert resolve_causal_lm(model).config._attn_implementation == resolve_causal_lm(ref).config._attn_implementation
    torch.testing.assert_close(loss_and_grads(model)[0], want_loss, rtol=1e-5, atol=1e-6)
