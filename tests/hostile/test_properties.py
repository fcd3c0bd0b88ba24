"""Property-based layer of the hostile suite: the loss and padding-free paths against the unpatched
model over generated batch shapes, padding sides, label masks and SlothConfig values."""
import warnings

import pytest
import torch

pytest.importorskip("hypothesis", reason="the property layer needs hypothesis (the [dev] extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sloth_plugins as sloth
from sloth_plugins.testing import probe_model, with_lora

_MODELS = {}


def models(family):
    """(unpatched, to-patch) LoRA models with equal weights, built once per family."""
    if family not in _MODELS:
        _MODELS[family] = tuple(with_lora(probe_model(family, seed=0)) for _ in range(2))
    return _MODELS[family]


@st.composite
def batches(draw):
    rows = draw(st.integers(1, 3))
    width = draw(st.integers(2, 12))
    side = draw(st.sampled_from(["right", "left"]))
    lengths = draw(st.lists(st.integers(1, width), min_size=rows, max_size=rows))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 384, (rows, width), generator=g)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        if side == "right":
            mask[r, :n] = 1
        else:
            mask[r, width - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    # arbitrary extra masking: prompts, holes, or every label
    drop = torch.rand(rows, width, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    labels = labels.masked_fill(drop, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


configs = st.builds(
    dict,
    loss=st.sampled_from(["chunked", "off"]),
    loss_chunk_size=st.sampled_from([None, 1, 3, 7]),
    padding_free=st.booleans(),
    kernels=st.sampled_from([True, False, ["rms_norm", "rope"], ["lora_mlp", "lora_qkv", "lora_o"]]),
    gradient_checkpointing=st.sampled_from(["off", "recompute", "offload", "auto"]),
)


def loss_and_grads(model, inputs, num_items=None):
    model.train()
    model.zero_grad(set_to_none=True)
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    loss = model(**inputs, **extra).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(inputs=batches(), options=configs, pass_num_items=st.booleans())
def test_loss_and_padding_free_match_the_unpatched_model(family, inputs, options, pass_num_items):
    ref, model = models(family)
    valid = int((inputs["labels"][:, 1:] != -100).sum())
    num_items = torch.tensor(valid) if pass_num_items and valid else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sloth.patch(model, sloth.SlothConfig(**options))
        try:
            loss, grads = loss_and_grads(model, inputs, num_items)
        finally:
            sloth.unpatch(model)
    ref_loss, ref_grads = loss_and_grads(ref, inputs, num_items)
    if valid == 0 and options["loss"] == "chunked":
        # no label to predict: the unpatched mean is NaN (0/0); sloth's loss is a finite 0 with zero grads
        assert loss.item() == 0.0 and all(not g.any() for g in grads.values())
        return
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, equal_nan=True, msg=name)
