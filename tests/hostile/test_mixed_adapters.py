"""Mixed-adapter inference through a patched PEFT model (issue #15).

``peft_model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])`` route each row
through its own adapter by forward pre-hooks PEFT registers on the LoRA layers for the call. The
fused LoRA MLP (and q/k/v in one autograd function) call no LoRA layer, so they must step aside
while a layer they would bypass has hooks: the results are PEFT's own, exactly.
"""
import pytest
import torch

import sloth_plugins as sloth
from sloth_plugins.testing import tiny_model

pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}          # Phi-3: fused gate_up, qkv
ADAPTERS = ["one", "two", "__base__", "two"]


def _two_adapters(family):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=TARGETS[family])
    model = get_peft_model(tiny_model(family), LoraConfig(**config), adapter_name="one")
    model.add_adapter("two", LoraConfig(**config))
    model.set_adapter("one")
    return model.eval()


def _inputs(rows=len(ADAPTERS), seq=6):
    g = torch.Generator().manual_seed(1)
    return dict(input_ids=torch.randint(3, 384, (rows, seq), generator=g),
                attention_mask=torch.ones(rows, seq, dtype=torch.long))


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_adapter_names_in_forward_and_generate_equal_peft(family):
    model = _two_adapters(family)
    inputs = _inputs()
    with torch.no_grad():
        want_logits = model(**inputs, adapter_names=ADAPTERS).logits
        want_single = model(**inputs).logits
    want_tokens = model.generate(**inputs, adapter_names=ADAPTERS, max_new_tokens=16, do_sample=False,
                                 min_new_tokens=16, pad_token_id=0)
    assert not torch.equal(want_logits, want_single)                 # the rows' adapters matter

    report = sloth.patch(model)
    layers = model.config.num_hidden_layers
    assert report.count("lora_mlp") == report.count("lora_qkv") == report.count("lora_o") == layers
    with torch.no_grad():
        assert torch.equal(model(**inputs, adapter_names=ADAPTERS).logits, want_logits)
        # without adapter_names the fused path runs again (same numbers to rounding)
        torch.testing.assert_close(model(**inputs).logits, want_single, rtol=1e-5, atol=1e-5)
    got_tokens = model.generate(**inputs, adapter_names=ADAPTERS, max_new_tokens=16, do_sample=False,
                                min_new_tokens=16, pad_token_id=0)
    assert torch.equal(got_tokens, want_tokens)


def test_a_forward_hook_on_a_bypassed_projection_is_honoured():
    model = _two_adapters("llama")
    inputs = _inputs(rows=2)
    sloth.patch(model)
    seen = []
    layer = model.base_model.model.model.layers[0]
    handles = [layer.mlp.up_proj.register_forward_hook(lambda m, a, out: seen.append("up") or out * 2),
               layer.self_attn.k_proj.register_forward_pre_hook(lambda m, a: seen.append("k"))]
    with torch.no_grad():
        got = model(**inputs).logits
    for handle in handles:
        handle.remove()
    assert sorted(seen) == ["k", "up"]
    sloth.unpatch(model)
    handles = [layer.mlp.up_proj.register_forward_hook(lambda m, a, out: out * 2)]
    with torch.no_grad():
        want = model(**inputs).logits
    handles[0].remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
