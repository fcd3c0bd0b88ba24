"""Smart gradient checkpointing: exact gradient parity for every mode, the plan, the offload pool.

CPU tests run in CI (fp32, exact equality); ``-m gpu`` tests run on the H200.
"""
import gc
import os
import tempfile
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import sloth_plugins as sloth
from sloth_plugins.checkpoint_offload import ActivationOffloader, HostBufferPool
from sloth_plugins.checkpoint_plan import (KEEP, OFFLOAD, RECOMPUTE, LayerMemory, MemoryModel, activation_peaks,
                                           plan_layers, predict_peak)
from sloth_plugins.plugins.checkpointing import (LayerCheckpointer, engine_checkpoint_phase,
                                                 get_checkpoint_controller)
from sloth_plugins.testing import tiny_model

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 384
GiB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# the plan, from given numbers
# ---------------------------------------------------------------------------------------------

def _uniform(n, full=100, inp=10):
    return [LayerMemory(full, inp) for _ in range(n)]


def test_peaks_by_hand():
    layers = [LayerMemory(100, 10), LayerMemory(120, 10), LayerMemory(100, 20), LayerMemory(90, 10)]
    # resident: 0 (offload) + 10 (recompute) + 100 (keep) + 90 (keep) = 200 at the end of the forward.
    # backward of layer j: resident below j + full_j + input of layer j-1 if offloaded (prefetch):
    #   j0: 100, j1: 0 + 120 + 10 = 130, j2: 0 + 10 + 100 = 110, j3: 0 + 10 + 100 + 90 = 200
    decisions = [OFFLOAD, RECOMPUTE, KEEP, KEEP]
    assert activation_peaks(layers, decisions) == (200, 200)
    model = MemoryModel(base_bytes=1000, forward_overhead=50, backward_overhead=7)
    assert predict_peak(layers, decisions, model) == 1000 + max(200 + 50, 200 + 7)
    # an offloaded layer below the last one is fetched back while the last one runs backward
    assert activation_peaks(layers, [RECOMPUTE, RECOMPUTE, OFFLOAD, KEEP]) == (10 + 10 + 0 + 90, 10 + 10 + 90 + 20)
    # inputs under offload_min_bytes stay on the device: offload behaves like recompute
    assert activation_peaks(layers, decisions, offload_min_bytes=11) == \
        activation_peaks(layers, [RECOMPUTE, RECOMPUTE, KEEP, KEEP], offload_min_bytes=11)


def test_plan_small_model_on_big_device_keeps_everything():
    plan = plan_layers(_uniform(16), budget_bytes=10_000, model=MemoryModel(base_bytes=5_000))
    assert plan.decisions == (KEEP,) * 16 and plan.fits
    assert plan.predicted_peak_bytes == 5_000 + 1_600


def test_plan_under_pressure_recomputes_the_fewest_layers_earliest_first():
    layers = _uniform(8)                       # keep-all activations: 800; each recompute frees 90
    plan = plan_layers(layers, budget_bytes=1_000 + 800 - 3 * 90, model=MemoryModel(base_bytes=1_000))
    assert plan.decisions == (RECOMPUTE,) * 3 + (KEEP,) * 5
    assert plan.predicted_peak_bytes == 1_000 + 800 - 3 * 90 and plan.fits
    one_byte_less = plan_layers(layers, budget_bytes=plan.predicted_peak_bytes - 1, model=MemoryModel(base_bytes=1_000))
    assert one_byte_less.decisions == (RECOMPUTE,) * 4 + (KEEP,) * 4


def test_plan_recomputes_the_layers_that_free_most_first():
    layers = [LayerMemory(100, 10), LayerMemory(300, 10), LayerMemory(100, 10), LayerMemory(100, 10)]
    # keep all: 600; recomputing layer 1 alone: 400 (its own activations return in its backward)
    plan = plan_layers(layers, budget_bytes=450)
    assert plan.decisions == (KEEP, RECOMPUTE, KEEP, KEEP) and plan.predicted_peak_bytes == 400


def test_plan_then_offloads_earliest_first_never_the_last_layer():
    layers = _uniform(6)
    all_recompute = activation_peaks(layers, [RECOMPUTE] * 5 + [KEEP])[1]     # 5 * 10 + 100
    assert all_recompute == 150
    plan = plan_layers(layers, budget_bytes=all_recompute - 20)
    assert plan.decisions == (OFFLOAD, OFFLOAD, RECOMPUTE, RECOMPUTE, RECOMPUTE, KEEP) and plan.fits
    tightest = plan_layers(layers, budget_bytes=1)
    # layer 4 would be fetched back while layer 5 starts its backward: offloading it frees nothing
    assert tightest.decisions == (OFFLOAD,) * 4 + (RECOMPUTE, KEEP)
    assert not tightest.fits and tightest.predicted_peak_bytes == 100 + 10
    assert "over budget" in tightest.summary()


def test_plan_never_offloads_small_inputs_and_can_be_told_not_to_offload():
    layers = _uniform(6)
    plan = plan_layers(layers, budget_bytes=1, model=MemoryModel(offload_min_bytes=11))
    assert OFFLOAD not in plan.decisions and plan.decisions[:5] == (RECOMPUTE,) * 5
    assert OFFLOAD not in plan_layers(layers, budget_bytes=1, allow_offload=False).decisions


def test_plan_recomputes_the_last_layer_when_the_forward_end_is_the_peak():
    # a big loss overhead (full logits) makes the end of the forward the peak: recomputing the
    # last layer lowers it even though its activations come back at the start of the backward
    layers = _uniform(3)
    model = MemoryModel(forward_overhead=1_000)
    plan = plan_layers(layers, budget_bytes=1_000 + 30, model=model)
    assert plan.decisions == (RECOMPUTE, RECOMPUTE, RECOMPUTE) and plan.predicted_peak_bytes == 1_030


def test_plan_is_monotonic_in_the_budget():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 12, (1,), generator=g))
        layers = [LayerMemory(int(f), int(i)) for f, i in zip(torch.randint(200, 400, (n,), generator=g),
                                                              torch.randint(5, 50, (n,), generator=g))]
        rank = {KEEP: 0, RECOMPUTE: 1, OFFLOAD: 2}
        previous = None
        for budget in range(0, 400 * n + 1, 97):
            plan = plan_layers(layers, budget_bytes=budget)
            assert plan.fits == (plan.predicted_peak_bytes <= budget)
            assert plan.predicted_peak_bytes == predict_peak(layers, plan.decisions)
            cost = sum(rank[d] for d in plan.decisions)
            if previous is not None:
                assert cost <= previous, "more budget never means more recompute or offload"
            previous = cost


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="decisions for"):
        activation_peaks(_uniform(2), [KEEP])
    with pytest.raises(ValueError, match="unknown checkpoint decision"):
        activation_peaks(_uniform(2), [KEEP, "sometimes"])


def test_peaks_by_hand_when_layers_do_not_save_their_input():
    # a bf16 Llama layer saves an fp32 copy of its input, not the input: kept, it holds 100
    # (its input is freed as the forward moves on); recomputed, it holds its input (10) and
    # its backward materialises both (110)
    layers = [LayerMemory(100, 10, input_saved=False) for _ in range(4)]
    assert layers[0].recompute_bytes == 110 and LayerMemory(100, 10).recompute_bytes == 100
    assert activation_peaks(layers, [KEEP] * 4) == (400, 400)
    # backward j: below + materialised_j + prefetched input of j-1:
    #   j0: 110, j1: 10 + 110 + 0 = 120, j2: 10 + 10 + 100 + 10 (layer 1 offloaded, fetched back) = 130,
    #   j3: 10 + 10 + 0 + 100 + 0 = 120
    assert activation_peaks(layers, [RECOMPUTE, RECOMPUTE, OFFLOAD, KEEP]) == (10 + 10 + 0 + 100, 130)
    assert activation_peaks(layers, [RECOMPUTE, OFFLOAD, KEEP, KEEP]) == (10 + 0 + 100 + 100, 10 + 100 + 100)
    model = MemoryModel(base_bytes=1000, forward_overhead=500, backward_overhead=20)
    # full logits make the end of the forward the peak: 1000 + 500 + 4 * 100
    assert predict_peak(layers, [KEEP] * 4, model) == 1900
    plan = plan_layers(layers, budget_bytes=1000 + 500 + 4 * 100 - 2 * 90, model=model)
    assert plan.decisions == (RECOMPUTE, RECOMPUTE, KEEP, KEEP) and plan.predicted_peak_bytes == 1720
    assert layers[0].scaled(2.0) == LayerMemory(200, 20, input_saved=False)


# ---------------------------------------------------------------------------------------------
# exact gradient parity on a tiny Llama (fp32, CPU): every mode, PEFT, dropout
# ---------------------------------------------------------------------------------------------

VARIANTS = {
    "full+dropout": dict(peft=False, dropout=0.1),
    "lora": dict(peft=True, dropout=0.0),                          # layer inputs do not require grad
    "lora+input_grads+dropout": dict(peft=True, dropout=0.1, input_grads=True, lora_dropout=0.1),
}
MODES = ["off", "recompute", "offload", "auto-framework", "auto-keep", "auto-partial", "auto-offload"]


def _model(peft=False, dropout=0.0, input_grads=False, lora_dropout=0.0, layers=4, seed=0):
    model = tiny_model("llama", seed=seed, layers=layers, attention_dropout=dropout, vocab_size=VOCAB)
    if peft:
        from peft import LoraConfig, get_peft_model
        # random B (not zeros): every LoRA weight gets a non-zero gradient to compare
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, init_lora_weights=False,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
        if input_grads:
            model.enable_input_require_grads()
    model.train()
    return model


def _steps(model, steps=3, shape=(2, 16), seed=1, shapes=None):
    """Losses and gradients of ``steps`` forward/backward passes (dropout draws from the global RNG)."""
    torch.manual_seed(seed)
    batches = [torch.randint(3, VOCAB, s) for s in (shapes or [shape] * steps)]
    out = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach().clone(), {n.removeprefix("module."): p.grad.clone()
                                            for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    return out


def _assert_identical(got, ref):
    assert len(got) == len(ref)
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, ref)):
        assert torch.equal(loss, ref_loss), f"step {step}: loss {loss} != {ref_loss}"
        assert grads.keys() == ref_grads.keys() and grads
        for name in ref_grads:
            assert not torch.isnan(grads[name]).any()
            assert torch.equal(grads[name], ref_grads[name]), f"step {step}: gradient of {name} differs"


def _measured_layers(variant):
    model = _model(**variant)
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="auto",
                                         memory_budget_gb=1000.0))
    _steps(model, steps=1)
    return get_checkpoint_controller(model).layer_memory


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
# auto: measuring, re-measuring, the report
# ---------------------------------------------------------------------------------------------

def test_auto_measures_once_then_plans_and_reports():
    model = _model(peft=True)
    budget = 1000.0
    report = sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=budget))
    controller = get_checkpoint_controller(model)
    assert "auto: planned after measuring the first training step" in report.summary()["gradient_checkpointing"]["how"]
    _steps(model, steps=1)
    assert controller.measurements == 1 and controller.decisions == (RECOMPUTE,) * 4   # the measuring step
    assert controller.measured_tokens == 32 and len(controller.layer_memory) == 4
    hidden = 64 * 4                                                    # hidden size x fp32
    for m in controller.layer_memory:
        assert m.input_bytes == 32 * hidden
        # every saved activation of a layer is at least its input plus q, k, v, attention and MLP tensors
        assert 4 * m.input_bytes < m.full_bytes < 200 * m.input_bytes
    _steps(model, steps=2)
    assert controller.measurements == 1 and controller.decisions == (KEEP,) * 4
    assert controller.plan.fits and controller.plan.budget_bytes == int(budget * GiB)
    assert controller.plan.predicted_peak_bytes == predict_peak(controller.layer_memory, [KEEP] * 4)
    assert report.summary()["gradient_checkpointing"]["how"] == ["auto: keep"]
    assert any("auto plan for 32 tokens: 4 keep, 0 recompute, 0 offload" in n for n in report.notes)
    assert "auto: keep" in str(report)


def _live_tensor_bytes():
    """Bytes of the distinct storages of every live Python tensor but parameters (a leak shows here)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
            try:
                storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):     # fake / functional tensors other tests left alive
                pass
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_measuring_step_leaves_nothing_behind(dtype):
    # The probe's saved tensors die with it. (An identity pack hook made each op that saves its
    # own output, rsqrt / softmax / attention, a C++ <-> Python cycle no gc can collect: on an
    # H200 the 1B model kept 14.5 GiB of probe activations for good, counted twice in the plan.)
    model = _model(peft=True).to(dtype)
    _steps(model, steps=1)
    before = _live_tensor_bytes()
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=1000.0))
    controller = get_checkpoint_controller(model)
    _steps(model, steps=1)
    assert controller.layer_memory is not None and controller.measurements == 1
    assert _live_tensor_bytes() == before
    _steps(model, steps=2)
    assert controller.decisions == (KEEP,) * 4 and _live_tensor_bytes() == before


def _bytes_saved_in_layers(model, ids):
    """Bytes autograd holds for the decoder layers at the end of a forward, counted apart from
    the probe: distinct storages saved from layer 0's start to the last layer's end (a
    checkpointed layer saves only its input there; an offloaded one nothing on the device),
    less parameters and what every layer shares (position embeddings)."""
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    state = dict(inside=False, shared=set(), held={})

    def key(t):
        return t.untyped_storage().data_ptr()

    def enter(module, args, kwargs):
        state["inside"] = True
        state["shared"] = {key(t) for t in _flat_tensors(kwargs)}

    def leave(module, args, out):
        state["inside"] = False

    def pack(t):
        if state["inside"]:
            state["held"].setdefault(key(t), t)
        return None                                 # forward only: nothing to unpack

    params = {key(p) for p in model.parameters()}
    handles = [layers[0].register_forward_pre_hook(enter, with_kwargs=True), layers[-1].register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            model(input_ids=ids, labels=ids)
    finally:
        for h in handles:
            h.remove()
    return sum(t.untyped_storage().nbytes() for k, t in state["held"].items()
               if k not in params and k not in state["shared"])


def _flat_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _flat_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _flat_tensors(item)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pressure", ["keep", "partial", "offload"])
def test_planned_resident_bytes_equal_what_autograd_holds(pressure, dtype):
    # fp32: the layer's first op (RMSNorm's .to(fp32) is a no-op) saves the input itself;
    # bf16: it saves an fp32 copy and the input is freed, as on the GPU
    model = _model(peft=True, dropout=0.1).to(dtype)
    ids = torch.randint(3, VOCAB, (2, 16))
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=1000.0))
    controller = get_checkpoint_controller(model)
    _steps(model, steps=1)
    layers = controller.layer_memory
    # (layer 0's input, the embedding output, needs no gradient under LoRA: nothing saves it)
    assert [m.input_saved for m in layers] == [False] + [dtype == torch.float32] * 3
    budget = {"keep": 1000 * GiB, "partial": predict_peak(layers, [RECOMPUTE, RECOMPUTE, KEEP, KEEP]), "offload": 1}
    controller.budget_bytes = budget[pressure]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _steps(model, steps=1)
    decisions = controller.decisions
    assert {"keep": KEEP, "partial": RECOMPUTE, "offload": OFFLOAD}[pressure] in decisions, decisions
    expected = activation_peaks(layers, decisions)[0]
    assert _bytes_saved_in_layers(model, ids) == expected, decisions


class ScriptedMemory:
    """Allocator counters of a pretend device, so the measuring code runs on CPU: memory at the
    forward's start is ``base``; the peak of each phase is what the plan model says for the
    decisions in force, plus fixed overheads (which auto must recover exactly)."""

    def __init__(self, controller, layers, base, forward_overhead, backward_overhead):
        self.controller, self.layers, self.base = controller, layers, base
        self.forward_overhead, self.backward_overhead = forward_overhead, backward_overhead
        self.resets = 0

    def allocated(self, device):
        return self.base

    def max_allocated(self, device):
        window = self.controller._window
        forward, backward = activation_peaks(self.layers, window.decisions)
        if window.in_backward:
            return self.base + self.backward_overhead + backward
        return self.base + self.forward_overhead + forward

    def reset_peak(self, device):
        self.resets += 1


def test_auto_calibrates_overheads_from_measured_peaks_and_verifies_its_plan():
    variant = VARIANTS["full+dropout"]
    layers = _measured_layers(variant)
    full = layers[0].full_bytes
    base, fo, bo = 10 * full, 3 * full, full // 2          # e.g. weights, logits and loss, gradients
    budget = base + fo + 2 * full
    model = _model(**variant)
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=budget / GiB))
    controller = get_checkpoint_controller(model)
    memory = controller.memory = ScriptedMemory(controller, layers, base, fo, bo)
    ref = _steps(_model(**variant), steps=4)
    got = _steps(model, steps=4)
    _assert_identical(got, ref)
    assert controller.layer_memory == layers
    assert (controller.forward_overhead, controller.backward_overhead) == (fo, bo)
    expected = plan_layers(layers, budget, MemoryModel(base, fo, bo))
    assert controller.plan == expected and expected.fits
    assert KEEP in expected.decisions and RECOMPUTE in expected.decisions
    assert plan_layers(layers, budget).decisions == (KEEP,) * 4, "without the overheads it would keep all"
    assert controller.measured_peak_bytes == expected.predicted_peak_bytes
    assert any("measured peak" in note for note in controller.report.notes)
    # measuring step: open + each probe + backward start; verifying step: open + backward start
    assert memory.resets == (1 + 4 + 1) + (1 + 1)
    # optimizer state appears between steps: the next forward plans against the new base
    memory.base += full
    _steps(model, steps=1)
    assert controller.plan == plan_layers(layers, budget, MemoryModel(base + full, fo, bo))
    assert controller.plan.decisions.count(KEEP) < expected.decisions.count(KEEP)


def _plan_diagnosis(controller, plan, model) -> str:
    m = controller.layer_memory
    return (f"{plan.summary()}; base {model.base_bytes / GiB:.3f} GiB, forward overhead "
            f"{model.forward_overhead / GiB:.3f}, backward overhead {model.backward_overhead / GiB:.3f}; "
            f"activations (forward end, backward) {[round(b / GiB, 3) for b in activation_peaks(m, plan.decisions)]} "
            f"GiB; layer 0 {m[0]}; {controller.measured_tokens} tokens measured; measured peak "
            f"{None if controller.measured_peak_bytes is None else round(controller.measured_peak_bytes / GiB, 3)} GiB")


def _replan_under_pressure(controller, pressure, run_steps):
    """Measure with a budget that keeps everything, then plan again under ``pressure`` on the same
    model, against the base memory the controller itself planned with (the budgets between plans
    are a few layer inputs apart). Returns (the plan of the measured step, budget, diagnosis)."""
    run_steps(2)                     # measures; then keeps all (and the optimizer state exists)
    layers, n = controller.layer_memory, len(controller.layer_memory)
    device = next(controller.model.parameters()).device
    memory = controller.memory_model(device, base_bytes=controller.forward_base_bytes)
    keep_all = predict_peak(layers, [KEEP] * n, memory)
    recompute_but_last = predict_peak(layers, [RECOMPUTE] * (n - 1) + [KEEP], memory)
    recompute_all = predict_peak(layers, [RECOMPUTE] * n, memory)
    tightest = plan_layers(layers, 1, memory).predicted_peak_bytes
    assert keep_all > recompute_but_last and recompute_all > tightest, \
        _plan_diagnosis(controller, controller.plan, memory)
    budget = {"keep": 1000 * GiB, "partial": (keep_all + recompute_but_last) // 2,
              "offload": (recompute_all + tightest) // 2}[pressure]
    controller.set_memory_budget(budget)
    run_steps(1)                     # plans for the new budget and measures this step's peak
    plan = controller.plan
    diagnosis = _plan_diagnosis(controller, plan, memory)
    assert plan.decisions == plan_layers(layers, budget, memory).decisions, \
        f"planned against base {controller.forward_base_bytes / GiB:.3f} GiB or other overheads: {diagnosis}"
    assert {"keep": KEEP, "partial": RECOMPUTE, "offload": OFFLOAD}[pressure] in plan.decisions, diagnosis
    assert plan.fits, f"{pressure}: budget {budget / GiB:.3f} GiB not met: {diagnosis}"
    assert controller.measured_peak_bytes is not None, f"the step of the new plan was not measured: {diagnosis}"
    return plan, budget, diagnosis


@pytest.mark.parametrize("pressure", ["keep", "partial", "offload"])
def test_auto_replans_for_a_new_budget_and_measures_that_step(pressure):
    # the GPU test's procedure on a pretend device whose peaks follow the plan model exactly
    variant = VARIANTS["lora"]
    layers = _measured_layers(variant)
    model = _model(**variant)
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=1000.0))
    controller = get_checkpoint_controller(model)
    full = layers[0].full_bytes
    controller.memory = ScriptedMemory(controller, layers, base=10 * full, forward_overhead=6 * full,
                                       backward_overhead=full)
    plan, budget, diagnosis = _replan_under_pressure(controller, pressure, lambda k: _steps(model, steps=k))
    assert controller.measured_peak_bytes == plan.predicted_peak_bytes, diagnosis
    assert controller.plan.budget_bytes == budget


class MallocCounters:
    """Allocator counters on CPU from glibc's mallinfo2 (bytes in use, heap and mmap), the peak
    polled after every aten op while the mode is active: auto's whole measure-and-predict path
    against a real allocator, as on a GPU."""

    peak = 0

    @staticmethod
    def libc():
        import ctypes
        import ctypes.util

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallinfo2.restype = MallInfo2
            return libc
        except (OSError, AttributeError):
            return None

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        self._libc = self.libc()
        counters = self

        class PollAfterEachOp(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counters.peak = max(counters.peak, counters.allocated(None))
                return out

        self.polling = PollAfterEachOp

    def allocated(self, device):
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def max_allocated(self, device):
        return max(self.peak, self.allocated(device))

    def reset_peak(self, device):
        self.peak = self.allocated(device)


@pytest.mark.skipif(MallocCounters.libc() is None, reason="needs glibc >= 2.33 (mallinfo2)")
@pytest.mark.parametrize("pressure", ["keep", "partial"])
def test_auto_predicted_peak_matches_a_real_allocator_on_cpu(pressure):
    # bf16 (a Llama layer then saves an fp32 copy of its input, as on the GPU), full logits
    torch.manual_seed(0)
    model = tiny_model("llama", layers=4, vocab_size=4096, hidden_size=128, dtype=torch.bfloat16)
    model.train()
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=1000.0))
    controller = get_checkpoint_controller(model)
    counters = controller.memory = MallocCounters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(3, 4096, (2, 512))

    def run_steps(k):
        for _ in range(k):
            with counters.polling():
                model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    plan, budget, diagnosis = _replan_under_pressure(controller, pressure, run_steps)
    measured, predicted = controller.measured_peak_bytes, plan.predicted_peak_bytes
    # The old probe's leak and input double count made it +11% on a model like this one. What
    # remains: allocator noise, and one-time allocations of a process's first step (thread pools,
    # scratch space), counted in the measuring step's overhead and then in the base (+1.7% for keep).
    assert abs(predicted - measured) <= 0.05 * measured, f"predicted {predicted}, measured {measured}: {diagnosis}"


def test_auto_measures_again_for_larger_inputs_and_scales_for_smaller():
    model = _model()
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=1000.0))
    controller = get_checkpoint_controller(model)
    _steps(model, shapes=[(2, 16)])
    first = list(controller.layer_memory)
    _steps(model, shapes=[(2, 32)])
    assert controller.measurements == 2 and controller.measured_tokens == 64
    for small, large in zip(first, controller.layer_memory):
        assert large.input_bytes == 2 * small.input_bytes
        assert 1.9 * small.full_bytes <= large.full_bytes <= 2.6 * small.full_bytes   # eager attention: s^2 part
    _steps(model, shapes=[(2, 8), (1, 16), (2, 34)])
    assert controller.measurements == 2, "smaller (or slightly larger) inputs reuse the measurement, scaled"
    assert controller.decisions == (KEEP,) * 4
    _steps(model, shapes=[(b, 16) for b in (5, 6, 7, 8, 9, 10, 12)])    # each > 1.1x the last
    assert controller.measurements == 8 and controller.measured_tokens == 10 * 16, "at most 8 measurements"


def test_auto_copes_with_layers_that_do_not_run():
    model = _model()
    model.config.num_hidden_layers = 3          # LlamaModel runs layers[:3]: the last one never runs
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=1000.0))
    controller = get_checkpoint_controller(model)
    controller.memory = ScriptedMemory(controller, _measured_layers(VARIANTS["lora"]), 0, 100, 10)
    _steps(model, steps=3)
    assert controller.measurements == 1 and len(controller.layer_memory) == 4
    assert controller.forward_overhead is not None, "the measuring step's backward was seen"
    assert controller.layer_memory[3] == controller.layer_memory[2]    # the largest counted stands in
    assert controller.decisions == (KEEP,) * 4


def test_auto_plan_changes_with_the_budget_and_keeps_parity_across_the_change():
    variant = VARIANTS["full+dropout"]
    layers = _measured_layers(variant)
    budget = predict_peak(layers, [RECOMPUTE, RECOMPUTE, KEEP, KEEP]) / GiB
    ref = _steps(_model(**variant), steps=4)
    model = _model(**variant)
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=budget))
    got = _steps(model, steps=4)
    _assert_identical(got, ref)
    assert get_checkpoint_controller(model).decisions == (RECOMPUTE, RECOMPUTE, KEEP, KEEP)


def test_a_third_party_plan_wins_and_bad_plans_are_rejected():
    class FixedPlan:
        plan = [KEEP, OFFLOAD, RECOMPUTE, KEEP]

        @sloth.hookimpl
        def sloth_checkpoint_plan(self, model, config, layers, budget_bytes):
            return self.plan

    pm = sloth.get_plugin_manager()
    plugin = FixedPlan()
    pm.register(plugin, name="test.fixed_plan")
    try:
        variant = VARIANTS["full+dropout"]
        ref = _steps(_model(**variant))
        model = _model(**variant)
        sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off"))
        _assert_identical(_steps(model), ref)
        assert get_checkpoint_controller(model).decisions == tuple(FixedPlan.plan)
        plugin.plan = [KEEP, "later"]
        with pytest.raises(ValueError, match="sloth_checkpoint_plan returned"):
            sloth.patch(_model(), sloth.SlothConfig(kernels=False, loss="off"))
    finally:
        pm.unregister(plugin)


def test_a_third_party_auto_plan_without_a_budget_follows_the_framework():
    class AutoPlan:
        @sloth.hookimpl
        def sloth_checkpoint_plan(self, model, config, layers, budget_bytes):
            return ["auto"] * len(layers)

    pm = sloth.get_plugin_manager()
    plugin = AutoPlan()
    pm.register(plugin, name="test.auto_plan")
    try:
        model = _model()
        report = sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="recompute"))
        controller = get_checkpoint_controller(model)
        assert not controller.auto and controller.budget_bytes is None
        how = report.summary()["gradient_checkpointing"]["how"]
        assert how == ["recompute when the framework enables checkpointing"]
        _steps(model, steps=1)
        assert controller.decisions == (KEEP,) * 4
        model.gradient_checkpointing_enable()
        _steps(model, steps=1)
        assert controller.decisions == (RECOMPUTE,) * 4
    finally:
        pm.unregister(plugin)


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
# the offloader and its pool
# ---------------------------------------------------------------------------------------------

class _Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + torch.nn.functional.dropout(torch.tanh(self.lin(x)), 0.1, self.training)


def test_offloader_hooks_park_only_the_checkpoint_input_and_match_plain_autograd():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(_Block(8) for _ in range(3))
    x = torch.randn(4, 8, requires_grad=True)

    def run(offloader):
        torch.manual_seed(5)
        h = x
        for i, block in enumerate(blocks):
            if offloader is None:
                h = block(h)
            else:
                with offloader.hooks(0, i):
                    h = checkpoint(block, h, use_reentrant=False)
        h.square().sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in blocks.parameters()]
        x.grad = None
        blocks.zero_grad(set_to_none=True)
        return grads

    ref = run(None)
    offloader = ActivationOffloader()
    got = run(offloader)
    assert offloader.parked_count == 3 and offloader.fetched_on_demand == 3   # no prefetch asked here
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert offloader.live_parked() == 0


def test_offloader_keeps_small_and_non_contiguous_tensors():
    offloader = ActivationOffloader(min_bytes=64)
    assert not offloader.should_park(torch.zeros(4))                   # 16 bytes
    assert offloader.should_park(torch.zeros(16))
    assert not offloader.should_park(torch.zeros(16, 16).t())
    assert not offloader.should_park(torch.nn.Parameter(torch.zeros(64)))
    assert ActivationOffloader().should_park(torch.zeros(1))           # CPU default: no minimum
    assert not ActivationOffloader().should_park(torch.zeros(0))


def test_pool_reuses_best_fit_and_stays_bounded():
    pool = HostBufferPool(pin=False)
    a = pool.acquire(5000)
    assert a.numel() == 8192
    pool.release(a)
    b = pool.acquire(4000)
    assert b is a and pool.stats().allocations == 1, "a large enough free buffer is reused"
    c = pool.acquire(100_000)
    pool.release(b)
    pool.release(c)
    assert pool.stats().total_bytes == 8192 + 131072 == pool.stats().high_water_bytes
    for _ in range(10):                   # alternating shapes: nothing new once both sizes exist
        for n in (5000, 100_000):
            pool.release(pool.acquire(n))
    assert pool.stats().allocations == 2 and pool.stats().in_use_bytes == 0
    pool.clear()
    assert pool.stats().total_bytes == 0


def test_pinning_failure_falls_back_to_pageable_memory_with_one_warning(monkeypatch):
    def fail(nbytes):
        raise RuntimeError("cudaHostAlloc failed: out of locked memory")

    monkeypatch.setattr(HostBufferPool, "_allocate_pinned", staticmethod(fail))
    pool = HostBufferPool(pin=True)
    with pytest.warns(RuntimeWarning, match="pinning host memory failed"):
        buffer = pool.acquire(100)
    assert not buffer.is_pinned() and not pool.pinned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool.acquire(100_000)              # no second warning


def test_offload_parity_when_pinning_fails(monkeypatch):
    from sloth_plugins import checkpoint_offload

    monkeypatch.setattr(checkpoint_offload.ActivationOffloader, "pool",
                        lambda self, device: self._pools.setdefault("cpu", HostBufferPool(pin=True)))
    variant = VARIANTS["full+dropout"]
    ref = _steps(_model(**variant))
    model = _model(**variant)
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="offload"))
    with pytest.warns(RuntimeWarning, match="pinning host memory failed"):
        got = _steps(model)
    _assert_identical(got, ref)
    assert not get_checkpoint_controller(model).offloader.pool("cpu").pinned


def test_thousand_steps_without_growth_of_the_host_pool():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(_Block(16) for _ in range(4))
    offloader = ActivationOffloader()
    pool = offloader.pool("cpu")
    shapes = [(8, 16), (3, 16), (8, 16), (5, 16)]     # varying batch sizes, as unpacked data gives
    history = []
    for step in range(1000):
        h = torch.randn(shapes[step % len(shapes)], requires_grad=True)
        for i, block in enumerate(blocks[:-1]):
            with offloader.hooks(step, i):
                h = checkpoint(block, h, use_reentrant=False)
            offloader.prefetch(step, i - 1) if i else None
        h = blocks[-1](h)
        h.sum().backward()
        assert offloader.live_parked() == 0, "every parked tensor was released after its backward"
        history.append(pool.stats())
    assert offloader.parked_count == 3000
    steady = history[len(shapes)]
    assert all(s.total_bytes == steady.total_bytes and s.allocations == steady.allocations for s in history[4:])
    # 3 parked layers, 8x16 fp32 at most (512 B, in the smallest 4 KiB buffers), nothing in use between steps
    assert steady.total_bytes == 3 * 4096 and steady.in_use_bytes == 0


def test_model_loop_does_not_accumulate_controller_state():
    model = _model(peft=True, layers=3)
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="offload"))
    controller = get_checkpoint_controller(model)
    _steps(model, steps=3)
    first = controller.offloader.pool("cpu").stats()
    shapes = [(2, 16), (1, 8), (2, 12)] * 20
    _steps(model, shapes=shapes)
    assert controller.offloader.pool("cpu").stats().allocations == first.allocations
    assert controller.offloader.live_parked() == 0 and not controller.offloader._parked
    gc.collect()


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


# ---------------------------------------------------------------------------------------------
# an engine's own checkpoint around the layers (FSDP / accelerate / Lightning activation
# checkpointing): detected on the installed torch, layers run plainly inside it
# ---------------------------------------------------------------------------------------------

def _phases(wrap, device="cpu"):
    """(grad enabled, engine_checkpoint_phase()) at each call of a function run through ``wrap``."""
    seen = []

    def layer(x):
        seen.append((torch.is_grad_enabled(), engine_checkpoint_phase()))
        return x.sin().cos() * x

    x = torch.randn(8, device=device, requires_grad=True)
    wrap(layer, x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return seen


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _composable(fn, x):
    from torch.distributed._composable import checkpoint as composable_checkpoint
    return composable_checkpoint(_Fn(fn))(x)


def _wrapper(impl_name):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    return lambda fn, x: checkpoint_wrapper(_Fn(fn), checkpoint_impl=getattr(CheckpointImpl, impl_name))(x)


ENGINE_PHASES = {
    "plain": (lambda fn, x: fn(x), [(True, None)]),
    "non_reentrant": (lambda fn, x: checkpoint(fn, x, use_reentrant=False), [(True, "forward"), (True, "recompute")]),
    # the reentrant forward runs under no_grad, which run_layer runs plainly without asking
    "reentrant": (lambda fn, x: checkpoint(fn, x, use_reentrant=True), [(False, None), (True, "recompute")]),
    "checkpoint_wrapper": (_wrapper("NO_REENTRANT"), [(True, "forward"), (True, "recompute")]),
    "checkpoint_wrapper_reentrant": (_wrapper("REENTRANT"), [(False, None), (True, "recompute")]),
    "composable_checkpoint": (_composable, [(True, "forward"), (True, "recompute")]),
    # saved-tensors hooks that are not a checkpoint (ours, save_on_cpu) are no engine checkpoint
    "save_on_cpu": (lambda fn, x: _under(torch.autograd.graph.save_on_cpu(), fn, x), [(True, None)]),
    "offloader_hooks": (lambda fn, x: _under(ActivationOffloader().hooks(0, 0), fn, x), [(True, None)]),
}


def _under(context, fn, x):
    with context:
        return fn(x)


@pytest.mark.parametrize("case", list(ENGINE_PHASES))
def test_engine_checkpoint_detection_works_on_the_installed_torch(case):
    # If this fails after a torch upgrade, engine_checkpoint_phase() reads torch internals that
    # changed: sloth would checkpoint (and offload, and probe) inside engines' checkpoints again.
    wrap, expected = ENGINE_PHASES[case]
    assert _phases(wrap) == expected, f"torch {torch.__version__}"
    assert engine_checkpoint_phase() is None


def test_engine_checkpoint_detection_degrades_to_never_without_the_private_api(monkeypatch):
    # torch < 2.8 has no _top_saved_tensors_default_hooks: both phases must then answer None, or a
    # plain forward and a checkpointed recompute under a non-reentrant engine would disagree
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    for case in ("non_reentrant", "reentrant", "composable_checkpoint"):
        wrap, expected = ENGINE_PHASES[case]
        assert _phases(wrap) == [(grad, None) for grad, _ in expected], case
    # and training under an engine is then what it was before: checkpointed twice, still exact
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    def engine(model):
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
        return model

    ref = _steps(engine(_model()))
    model = _model()
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="offload"))
    _assert_identical(_steps(engine(model)), ref)
    controller = get_checkpoint_controller(model)
    assert not controller.engine_layers and controller.offloader.parked_count > 0


@pytest.mark.parametrize("mode", ["recompute", "auto"])
def test_a_non_reentrant_checkpoint_around_the_whole_model_counts_as_an_engine(mode):
    # any non-reentrant torch checkpoint around our layers counts, not only FSDP's wrapper
    ref_model, model = _model(), _model()
    options = dict(memory_budget_gb=1e-9) if mode == "auto" else {}
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing=mode, **options))

    def whole(m):
        inner = m.model.forward
        m.model.forward = lambda *a, **k: checkpoint(inner, *a, use_reentrant=False, **k)
        return m

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _assert_identical(_steps(whole(model)), _steps(whole(ref_model)))
    controller = get_checkpoint_controller(model)
    assert controller.engine_layers == {0, 1, 2, 3} and controller.offloader.parked_count == 0
    assert controller.generation == 0, "no forward of ours began: nothing measured, nothing planned"


# ---------------------------------------------------------------------------------------------
# GPU (H200): bf16 parity, the plan's prediction against the measured peak, no growth
# ---------------------------------------------------------------------------------------------

def _gpu_model(layers=8, hidden=1024, seed=0, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         max_position_embeddings=4096, attention_dropout=dropout, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False,
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    return model


def _gpu_steps(model, steps, shape=(4, 1024), optimizer=None, seed=1, after_step=None):
    torch.manual_seed(seed)
    batches = [torch.randint(0, 32000, shape, device="cuda") for _ in range(steps)]
    out = []
    for i, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach().float().cpu(), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
                                                  if p.grad is not None}))
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(i)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["recompute", "offload", "auto"])
def test_gpu_bf16_parity(mode):
    ref = _gpu_steps(_gpu_model(dropout=0.1), steps=3)
    model = _gpu_model(dropout=0.1)
    options = dict(memory_budget_gb=1e-9) if mode == "auto" else {}      # auto: the tightest plan, with offload
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing=mode, **options))
        got = _gpu_steps(model, steps=3)
    for (loss, grads), (ref_loss, ref_grads) in zip(got, ref):
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)     # the same forward computation
        assert grads.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            assert g.norm() > 0, name
            err = (grads[name] - g).norm() / g.norm().clamp_min(1e-12)
            assert err < 2e-2, f"{name}: relative error {err:.3g}"
    offloader = get_checkpoint_controller(model).offloader
    if mode != "recompute":
        assert offloader.parked_count > 0 and offloader.pool("cuda").pinned
        assert offloader.fetched_on_demand == 0, "every parked input was prefetched before its backward"


@pytest.mark.gpu
@pytest.mark.parametrize("pressure", ["keep", "partial", "offload"])
def test_gpu_measured_peak_within_10_percent_of_prediction(pressure):
    model = _gpu_model()
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=1000.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    c = get_checkpoint_controller(model)
    plan, budget, diagnosis = _replan_under_pressure(c, pressure, lambda k: _gpu_steps(model, k, optimizer=optimizer))
    measured, predicted = c.measured_peak_bytes, plan.predicted_peak_bytes
    error = (predicted - measured) / measured
    assert abs(error) <= 0.10, (f"{pressure}: predicted {predicted / GiB:.3f} GiB is {error:+.1%} off the measured "
                                f"{measured / GiB:.3f} GiB (allowed: 10%): {diagnosis}")


@pytest.mark.gpu
def test_gpu_auto_keeping_everything_costs_no_more_memory_than_no_checkpointing():
    # auto's measuring step must leave nothing behind (its probe once leaked 0.9 GiB here, 14.5 GiB
    # on the 1B model), and keeping every layer must hold what plain autograd holds.
    peaks, after = {}, {}
    for mode in ("hf", "auto"):
        gc.collect()
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()
        model = _gpu_model()
        if mode == "auto":
            sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=1000.0))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        _gpu_steps(model, steps=2, optimizer=optimizer)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _gpu_steps(model, steps=2, optimizer=optimizer)
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - start
        after[mode] = torch.cuda.memory_allocated() - start
        if mode == "auto":
            assert get_checkpoint_controller(model).decisions == (KEEP,) * 8
            sloth.unpatch(model)
        del model, optimizer
    summary = {k: f"peak {peaks[k] / GiB:.3f} GiB, after the step {after[k] / GiB:.3f} GiB (above the start)"
               for k in peaks}
    assert after["auto"] <= after["hf"] + 16 * 2 ** 20, f"auto left memory behind: {summary}"
    assert peaks["auto"] <= 1.02 * peaks["hf"], f"auto keeping all holds more than no checkpointing: {summary}"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["offload", "auto"])
def test_gpu_no_memory_growth_over_steps(mode):
    model = _gpu_model(layers=6)
    options = dict(memory_budget_gb=1e-9) if mode == "auto" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing=mode, **options))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        offloader = get_checkpoint_controller(model).offloader
        allocated, pools = [], []

        def record(_):
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())
            pools.append(offloader.pool("cuda").stats())

        _gpu_steps(model, steps=30, shape=(2, 1024), optimizer=optimizer, after_step=record)
    assert len(set(allocated[3:])) == 1, f"device memory changed between steps: {allocated}"
    assert len({(p.total_bytes, p.allocations) for p in pools[3:]}) == 1, "the pinned pool grew"
    assert offloader.live_parked() == 0 and pools[-1].in_use_bytes == 0


@pytest.mark.gpu
def test_gpu_offload_lowers_the_peak_below_recompute_and_survives_pageable_memory(monkeypatch):
    peaks = {}
    for mode in ("recompute", "offload"):
        model = _gpu_model()
        sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing=mode))
        _gpu_steps(model, steps=2)
        torch.cuda.reset_peak_memory_stats()
        _gpu_steps(model, steps=2)
        peaks[mode] = torch.cuda.max_memory_allocated()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    parked_input = 4 * 1024 * 1024 * 2                      # bs 4 x 1024 tokens x hidden 1024 x bf16
    assert peaks["offload"] <= peaks["recompute"] - 4 * parked_input, peaks

    def fail(nbytes):
        raise RuntimeError("cudaHostAlloc failed: out of locked memory")

    monkeypatch.setattr(HostBufferPool, "_allocate_pinned", staticmethod(fail))
    ref = _gpu_steps(_gpu_model(), steps=2)
    model = _gpu_model()
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="offload"))
    with pytest.warns(RuntimeWarning, match="pinning host memory failed"):
        got = _gpu_steps(model, steps=2)
    assert not get_checkpoint_controller(model).offloader.pool("cuda").pinned
    for (loss, grads), (ref_loss, ref_grads) in zip(got, ref):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
        for name, g in ref_grads.items():
            assert (grads[name] - g).norm() / g.norm() < 2e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["offload", "auto"])
@pytest.mark.parametrize("impl", ["NO_REENTRANT", "REENTRANT"])
def test_gpu_engine_checkpointing_is_detected_and_not_doubled(impl, mode):
    """The GPU image's torch (2.11) answers as the CPU one; CUDA tensors, their autograd thread,
    the offloader's streams: one recompute per layer, nothing parked, the engine's own numbers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    for case in ("plain", "non_reentrant", "reentrant", "composable_checkpoint"):
        wrap, expected = ENGINE_PHASES[case]
        assert _phases(wrap, "cuda") == expected, (case, torch.__version__)

    def run(patched):
        model = _gpu_model(layers=4)
        model.enable_input_require_grads()          # a reentrant checkpoint needs an input that requires grad
        if patched:
            options = dict(memory_budget_gb=1e-9) if mode == "auto" else {}
            sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing=mode, **options))
        layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
                                       checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(
                                           m, checkpoint_impl=getattr(CheckpointImpl, impl)))
        calls = []
        for layer in layers:
            layer.mlp.register_forward_pre_hook(lambda module, args: calls.append(1))
        torch.manual_seed(1)
        out = []
        for _ in range(2):
            ids = torch.randint(0, 32000, (2, 512), device="cuda")
            calls.clear()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss   # no KV cache across recomputes
            loss.backward()
            grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
            out.append((loss.item(), grads, len(calls) / len(layers)))
            model.zero_grad(set_to_none=True)
        return out, get_checkpoint_controller(model)

    ref, _ = run(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got, controller = run(True)
    assert controller.engine_layers == {0, 1, 2, 3} and controller.offloader.parked_count == 0
    for (loss, grads, calls), (ref_loss, ref_grads, ref_calls) in zip(got, ref):
        assert (calls, ref_calls) == (2, 2), "the forward and one recompute per layer"
        assert loss == pytest.approx(ref_loss, rel=1e-3)
        assert grads.keys() == ref_grads.keys() and grads
        for name, g in ref_grads.items():
            err = (grads[name] - g).norm() / g.norm().clamp_min(1e-12)
            assert torch.isfinite(grads[name]).all() and err < 1e-2, f"{name}: relative error {err:.3g}"
