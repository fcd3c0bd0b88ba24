"""An engine's own checkpoint around the layers (``checkpointing.engines``): detected on the installed
torch, layers run plainly inside it."""
import os
import warnings

import pytest
import torch

# this folder's helpers.py, loaded by conftest.py
from checkpointing_helpers import _assert_identical, _gpu_model, _model, _steps
from torch.utils.checkpoint import checkpoint

import sloth_plugins as sloth
from sloth_plugins.checkpointing import get_checkpoint_controller
from sloth_plugins.checkpointing.engines import engine_checkpoint_phase
from sloth_plugins.checkpointing.offload import ActivationOffloader

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


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["offload", "auto"])
@pytest.mark.parametrize("impl", ["NO_REENTRANT", "REENTRANT"])
def test_gpu_engine_checkpointing_is_detected_and_not_doubled(impl, mode):
    """The GPU image's torch (2.11) answers as the CPU one; CUDA tensors, their autograd thread,
    the offloader's streams: one recompute per layer, nothing parked, the engine's own numbers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
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


class _Checkpointed(torch.nn.Module):
    """A decoder layer inside an engine's checkpoint function (as ``checkpoint_wrapper`` wraps it)."""

    def __init__(self, layer, fn):
        super().__init__()
        self.layer, self.fn = layer, fn

    def forward(self, hidden, *args, **kwargs):
        return self.fn(lambda h: self.layer(h, *args, **kwargs), hidden)


def _deepspeed_checkpointing():
    pytest.importorskip("deepspeed")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.runtime.activation_checkpointing import checkpointing
    return checkpointing


@pytest.mark.parametrize("impl", ["checkpoint", "non_reentrant_checkpoint"])
def test_deepspeed_activation_checkpointing_is_detected(impl):
    """DeepSpeed's own checkpoint functions (what its ``activation_checkpointing`` config drives, called
    by the model's code): the reentrant one like torch's reentrant, the non-reentrant one by its hooks."""
    fn = getattr(_deepspeed_checkpointing(), impl)
    expected = ENGINE_PHASES["reentrant" if impl == "checkpoint" else "non_reentrant"][1]
    assert _phases(lambda layer, x: fn(layer, x)) == expected
    assert engine_checkpoint_phase() is None


@pytest.mark.parametrize("impl", ["checkpoint", "non_reentrant_checkpoint"])
def test_deepspeed_checkpointed_layers_run_once_plainly_inside_it(impl):
    """Decoder layers checkpointed by DeepSpeed's function: sloth's recompute stays out (one recompute,
    the report names the engine), and the training numbers are the engine's alone."""
    fn = getattr(_deepspeed_checkpointing(), impl)

    def engine(model):
        # around the layer's call, as the engine's wrapper puts it (transformers < 5.17 checkpoints in
        # the layer's __call__: wrapping its forward would put the engine's checkpoint inside ours)
        model.config.use_cache = False   # a reentrant recompute would append to the KV cache a second time
        layers = model.model.layers
        for i, layer in enumerate(layers):
            layers[i] = _Checkpointed(layer, fn)
        return model

    ref = _steps(engine(_model()))
    model = _model()
    report = sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="recompute"))
    _assert_identical(_steps(engine(model)), ref)
    controller = get_checkpoint_controller(model)
    assert controller.engine_layers == set(range(len(model.model.layers)))
    assert any("already checkpoints every decoder layer" in n and "DeepSpeed" in n for n in report.notes)


def _reentrant_checkpoint(impl):
    if impl == "torch":
        return lambda f, h: checkpoint(f, h, use_reentrant=True)
    return getattr(_deepspeed_checkpointing(), impl)


@pytest.mark.parametrize("impl", ["torch", "checkpoint", "non_reentrant_checkpoint"])
def test_a_layer_running_a_reentrant_checkpoint_of_its_own_goes_to_torchs_checkpoint(impl):
    """The model's own code checkpoints a part of the layer with a reentrant checkpoint (torch's
    use_reentrant=True, DeepSpeed's two), inside sloth's checkpoint of the layer: it refuses sloth's
    capturing backward, which is redone as it wants it, once, with a warning; the layer runs under
    torch's checkpoint from then on. The numbers are those without sloth."""
    fn = _reentrant_checkpoint(impl)

    def nest(model):
        for layer in model.model.layers:
            inner = layer.mlp.forward
            layer.mlp.forward = lambda h, _inner=inner: fn(_inner, h)
        return model

    ref = _steps(nest(_model()))
    model = nest(_model())
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="recompute"))
    with pytest.warns(UserWarning, match="runs a reentrant checkpoint of its own") as caught:
        got = _steps(model)
    assert sum("reentrant checkpoint of its own" in str(w.message) for w in caught) == len(model.model.layers)
    _assert_identical(got, ref)
    assert all(p.fallback for p in get_checkpoint_controller(model).parameters)

    # under backward(inputs=...) such a checkpoint refuses without sloth too: its error stands
    fresh = nest(_model())
    sloth.patch(fresh, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="recompute"))
    ids = torch.randint(3, 300, (2, 8))
    for m in (nest(_model()), fresh):
        loss = m(input_ids=ids, labels=ids).loss
        with pytest.raises(RuntimeError, match=r"\.grad\(\)"):
            loss.backward(inputs=[m.model.embed_tokens.weight])
