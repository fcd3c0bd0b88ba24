"""The gradient-checkpointing plan (``sloth_plugins.checkpointing.plan``), from given numbers."""
import pytest
import torch

from sloth_plugins.checkpointing.plan import (
    KEEP,
    OFFLOAD,
    RECOMPUTE,
    LayerMemory,
    MemoryModel,
    activation_peaks,
    plan_layers,
    predict_peak,
)

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
