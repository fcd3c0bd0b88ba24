"""``auto``: measuring (``checkpointing.measure``), planning and re-planning, the report."""
import gc
import warnings

import pytest
import torch

# this folder's helpers.py, loaded by conftest.py
from checkpointing_helpers import (
    VARIANTS,
    VOCAB,
    GiB,
    _assert_identical,
    _measured_layers,
    _model,
    _replan_under_pressure,
    _steps,
)

import sloth_plugins as sloth
from sloth_plugins.checkpointing import get_checkpoint_controller
from sloth_plugins.checkpointing.plan import (
    KEEP,
    OFFLOAD,
    RECOMPUTE,
    MemoryModel,
    activation_peaks,
    plan_layers,
    predict_peak,
)
from sloth_plugins.testing import tiny_model

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
    assert controller.meter.measurements == 1 and controller.decisions == (RECOMPUTE,) * 4   # the measuring step
    assert controller.meter.measured_tokens == 32 and len(controller.meter.layer_memory) == 4
    hidden = 64 * 4                                                    # hidden size x fp32
    for m in controller.meter.layer_memory:
        assert m.input_bytes == 32 * hidden
        # every saved activation of a layer is at least its input plus q, k, v, attention and MLP tensors
        assert 4 * m.input_bytes < m.full_bytes < 200 * m.input_bytes
    _steps(model, steps=2)
    assert controller.meter.measurements == 1 and controller.decisions == (KEEP,) * 4
    assert controller.plan.fits and controller.plan.budget_bytes == int(budget * GiB)
    assert controller.plan.predicted_peak_bytes == predict_peak(controller.meter.layer_memory, [KEEP] * 4)
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
    assert controller.meter.layer_memory is not None and controller.meter.measurements == 1
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
    layers = controller.meter.layer_memory
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
        window = self.controller.meter.window
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
    memory = controller.meter.memory = ScriptedMemory(controller, layers, base, fo, bo)
    ref = _steps(_model(**variant), steps=4)
    got = _steps(model, steps=4)
    _assert_identical(got, ref)
    assert controller.meter.layer_memory == layers
    assert (controller.meter.forward_overhead, controller.meter.backward_overhead) == (fo, bo)
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


@pytest.mark.parametrize("pressure", ["keep", "partial", "offload"])
def test_auto_replans_for_a_new_budget_and_measures_that_step(pressure):
    # the GPU test's procedure on a pretend device whose peaks follow the plan model exactly
    variant = VARIANTS["lora"]
    layers = _measured_layers(variant)
    model = _model(**variant)
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=1000.0))
    controller = get_checkpoint_controller(model)
    full = layers[0].full_bytes
    controller.meter.memory = ScriptedMemory(controller, layers, base=10 * full, forward_overhead=6 * full,
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
    counters = controller.meter.memory = MallocCounters()
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
    first = list(controller.meter.layer_memory)
    _steps(model, shapes=[(2, 32)])
    assert controller.meter.measurements == 2 and controller.meter.measured_tokens == 64
    for small, large in zip(first, controller.meter.layer_memory):
        assert large.input_bytes == 2 * small.input_bytes
        assert 1.9 * small.full_bytes <= large.full_bytes <= 2.6 * small.full_bytes   # eager attention: s^2 part
    _steps(model, shapes=[(2, 8), (1, 16), (2, 34)])
    assert controller.meter.measurements == 2, "smaller (or slightly larger) inputs reuse the measurement, scaled"
    assert controller.decisions == (KEEP,) * 4
    _steps(model, shapes=[(b, 16) for b in (5, 6, 7, 8, 9, 10, 12)])    # each > 1.1x the last
    assert controller.meter.measurements == 8 and controller.meter.measured_tokens == 10 * 16, "at most 8 measurements"


def test_auto_copes_with_layers_that_do_not_run():
    model = _model()
    model.config.num_hidden_layers = 3          # LlamaModel runs layers[:3]: the last one never runs
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", memory_budget_gb=1000.0))
    controller = get_checkpoint_controller(model)
    controller.meter.memory = ScriptedMemory(controller, _measured_layers(VARIANTS["lora"]), 0, 100, 10)
    _steps(model, steps=3)
    assert controller.meter.measurements == 1 and len(controller.meter.layer_memory) == 4
    assert controller.meter.forward_overhead is not None, "the measuring step's backward was seen"
    assert controller.meter.layer_memory[3] == controller.meter.layer_memory[2]    # the largest counted stands in
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
