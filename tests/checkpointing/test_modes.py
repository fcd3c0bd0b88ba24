"""Every checkpointing mode: exact gradient parity (fp32, CPU), the framework's own enable, patch /
unpatch, DDP."""
import os
import tempfile
import warnings

import pytest
import torch

# this folder's helpers.py, loaded by conftest.py
from checkpointing_helpers import VARIANTS, VOCAB, GiB, _assert_identical, _measured_layers, _model, _steps

import sloth_plugins as sloth
from sloth_plugins.checkpointing import get_checkpoint_controller
from sloth_plugins.checkpointing.controller import LayerCheckpointer
from sloth_plugins.checkpointing.plan import KEEP, OFFLOAD, RECOMPUTE, predict_peak

MODES = ["off", "recompute", "offload", "auto-framework", "auto-keep", "auto-partial", "auto-offload"]


def _config(mode, variant):
    if mode == "off" or mode in ("recompute", "offload"):
        return dict(gradient_checkpointing=mode)
    if mode == "auto-framework":        # no budget on CPU: follows the framework, which did not enable it
        return dict(gradient_checkpointing="auto")
    layers = _measured_layers(variant)
    keep_all = predict_peak(layers, [KEEP] * len(layers))
    budget = {"auto-keep": 1000 * GiB, "auto-partial": keep_all - 1, "auto-offload": 1}[mode]
    return dict(gradient_checkpointing="auto", memory_budget_gb=budget / GiB)


EXPECTED_AUTO = {"auto-keep": (KEEP,) * 4, "auto-offload": (OFFLOAD, OFFLOAD, RECOMPUTE, KEEP)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
def test_exact_gradient_parity(mode, variant):
    ref = _steps(_model(**VARIANTS[variant]))
    model = _model(**VARIANTS[variant])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # auto-offload: the 1-byte budget cannot fit
        report = sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", **_config(mode, VARIANTS[variant])))
        got = _steps(model)
    _assert_identical(got, ref)
    controller = get_checkpoint_controller(model)
    if mode == "off":
        assert controller is None and report.count("gradient_checkpointing") == 0
        return
    if mode == "auto-partial":
        # one layer recomputed, the one that frees most: with LoRA and no input grads, layer 0
        # saves less (nothing needs its input's gradient), so it is not that one
        expected = controller.decisions
        assert sorted(expected) == [KEEP, KEEP, KEEP, RECOMPUTE] and expected[-1] == KEEP
        assert (expected[0] == KEEP) == (variant == "lora")
    else:
        expected = {"recompute": (RECOMPUTE,) * 4, "offload": (OFFLOAD,) * 3 + (RECOMPUTE,),
                    "auto-framework": (KEEP,) * 4, **EXPECTED_AUTO}[mode]
        assert controller.decisions == expected
    parked = controller.offloader.parked_count
    planned_steps = 2 if mode in EXPECTED_AUTO or mode == "auto-partial" else 3     # auto measures in step 1
    assert parked == planned_steps * expected.count(OFFLOAD), "every offloaded layer parked its input, every step"
    if parked:
        # the last layer's backward prefetches the layer below; each layer's backward the next one
        assert controller.offloader.prefetched == parked and controller.offloader.fetched_on_demand == 0
    assert controller.offloader.live_parked() == 0
    assert report.count("gradient_checkpointing") == 4


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("order", ["enable-then-patch", "patch-then-enable"])
@pytest.mark.parametrize("mode", ["offload", "auto"])
def test_hf_gradient_checkpointing_enable_either_way(mode, order, use_reentrant):
    variant = VARIANTS["lora+input_grads+dropout"]
    ref_model = _model(**variant)
    ref_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ref = _steps(ref_model)
    model = _model(**variant)
    config = sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing=mode)

    def enable():
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})

    if order == "enable-then-patch":
        enable()
        sloth.patch(model, config)
    else:
        sloth.patch(model, config)
        enable()
    layers = model.get_base_model().model.layers
    assert all(isinstance(layer._gradient_checkpointing_func, LayerCheckpointer) for layer in layers)
    got = _steps(model)
    _assert_identical(got, ref)
    controller = get_checkpoint_controller(model)
    assert controller.decisions == ((OFFLOAD,) * 3 + (RECOMPUTE,) if mode == "offload" else (RECOMPUTE,) * 4)
    sloth.unpatch(model)
    assert all(layer.gradient_checkpointing for layer in layers), "unpatch keeps the framework's choice"
    assert not any(isinstance(layer._gradient_checkpointing_func, LayerCheckpointer) for layer in layers)


def test_auto_follows_the_framework_without_a_budget():
    model = _model()
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off"))      # auto, CPU, no memory_budget_gb
    controller = get_checkpoint_controller(model)
    _steps(model, steps=1)
    assert controller.decisions == (KEEP,) * 4
    model.gradient_checkpointing_enable()
    _steps(model, steps=1)
    assert controller.decisions == (RECOMPUTE,) * 4
    model.gradient_checkpointing_disable()
    _steps(model, steps=1)
    assert controller.decisions == (KEEP,) * 4


@pytest.mark.parametrize("mode", ["recompute", "auto"])
def test_generation_in_train_mode_without_grad_keeps_the_kv_cache(mode):
    model = _model(layers=2)
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing=mode))
    with torch.no_grad():
        assert model(ids, use_cache=True).past_key_values.get_seq_length() == 8
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), expected)
    assert all(layer.gradient_checkpointing for layer in model.model.layers), "on while grad is enabled"


# ---------------------------------------------------------------------------------------------
# patch / unpatch
# ---------------------------------------------------------------------------------------------

def test_unpatch_restores_the_layers_exactly_and_frees_the_pool():
    model = _model()
    layers = list(model.model.layers)
    before = [dict(layer.__dict__) for layer in layers]
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="offload"))
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="offload"))  # re-assert
    controller = get_checkpoint_controller(model)
    _steps(model, steps=2)
    assert controller.offloader.pool("cpu").stats().total_bytes > 0
    assert sloth.unpatch(model)
    assert get_checkpoint_controller(model) is None
    assert controller.offloader.pool("cpu").stats().total_bytes == 0
    for layer, state in zip(layers, before):
        assert layer.__dict__.keys() == state.keys()
        assert all(layer.__dict__[k] is v for k, v in state.items() if not isinstance(v, torch.nn.Module))
    assert "_set_gradient_checkpointing" not in model.__dict__


# ---------------------------------------------------------------------------------------------
# DDP (one process, gloo)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["offload", "auto"])
def test_ddp_parity(mode):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    variant = VARIANTS["lora+input_grads+dropout"]
    ref = _steps(_model(**variant))
    store_file = tempfile.NamedTemporaryFile(delete=False)
    store_file.close()
    dist.init_process_group("gloo", init_method=f"file://{store_file.name}", rank=0, world_size=1)
    try:
        model = _model(**variant)
        options = dict(memory_budget_gb=1e-9) if mode == "auto" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing=mode, **options))
            ddp = DDP(model)
            got = _steps(ddp)
        _assert_identical(got, ref)
        assert get_checkpoint_controller(ddp).offloader.parked_count > 0
    finally:
        dist.destroy_process_group()
        os.unlink(store_file.name)
