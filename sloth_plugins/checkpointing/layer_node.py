"""A decoder layer's checkpoint as one autograd node, with no hook per saved tensor.

torch's non-reentrant checkpoint runs the layer with grad enabled and a pair of saved-tensor
hooks around every tensor the layer saves, in the forward and again in the recompute: about
40 Python calls a tensor, a quarter of the host's Python in an 8B QLoRA step, which is
host-bound. Here the forward runs under ``no_grad`` (autograd records and saves nothing), one
node holds the layer's inputs (parked in host memory when offloading), and its backward runs
the forward again with grad and differentiates it, as torch's reentrant checkpoint does.

Unlike that one, the node's inputs are the layer's tensor arguments *and* its parameters that
require grad, and its backward returns their gradients instead of accumulating them from a
nested backward. So the engine knows which parameters depend on the node: ``.backward()``,
``backward(inputs=...)``, ``torch.autograd.grad`` and gradient accumulation give exactly what
they give without checkpointing, also when no input requires grad (frozen embeddings under
PEFT). A trainable tensor the layer reaches other than through its arguments or its own
parameters (another module's parameter, a shared weight) is looked for once per layer, in the
recompute's graph: if there is one, it gets its gradient accumulated that time, with a warning,
and the layer goes to torch's checkpoint from then on (``LayerParameters.fallback``). So does a
layer whose own code runs a reentrant checkpoint (torch's ``use_reentrant=True``, DeepSpeed's),
which refuses the capturing backward: that backward is redone as the reentrant checkpoint wants it,
accumulating in ``.grad``, with a warning. Not supported, with an error that says so:
``create_graph=True`` (double backward) and a second backward through the same graph
(``retain_graph=True``).

``usable`` routes to torch's non-reentrant checkpoint what this does not cover:
calls whose per-layer outputs transformers records (``recording_outputs``), torch.distributed
runs (DDP's and FSDP's gradient hooks are proven with torch's checkpoint),
torch.compile tracing, trainable tensors bound in the layer's call (a partial's keywords or
positional arguments; the node's inputs are the call's own tensor arguments). The forward and
the recompute run under the same autocast and RNG state, so they compute the same values.
"""
from __future__ import annotations

import sys
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Hashable, Optional, Sequence, Tuple

import torch
from torch.utils._pytree import tree_flatten

from .offload import ActivationOffloader, ParkedTensor

_registrations = 0          # modules and parameters registered into a watched layer so far
_watched: dict = {}         # id -> weakref of the modules of those layers (no hashing: a module may be unhashable)
_registration_hooks = None


def usable(function: Callable, kwargs: dict) -> bool:
    if kwargs or torch.compiler.is_compiling() or recording_outputs():
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    bound = (getattr(function, "args", ()), getattr(function, "keywords", {}))    # a partial's arguments
    return not any(t.requires_grad for t in tensors_in(bound))


def recording_outputs() -> bool:
    """transformers (5.x) is recording per-layer outputs of this call through forward hooks (a MoE
    model's router logits for its load-balancing loss, hidden states, attentions). Recorded in this
    node's ``no_grad`` forward they would be cut from the graph: the load-balancing loss would lose
    its gradient. torch's non-reentrant checkpoint records them with their graph."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    if collector is None:
        return False
    try:
        return bool(collector.get())
    except Exception:  # noqa: BLE001 - another transformers layout: assume the worst
        return True


@contextmanager
def outputs_not_recorded():
    """transformers records no per-layer outputs in this block: for a forward that is not the step's
    own (the memory probe's extra run of a layer), whose router logits would otherwise be counted
    twice by a MoE load-balancing loss and tie it to a graph that has no backward."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    if collector is None or not recording_outputs():
        yield
        return
    token = collector.set(None)
    try:
        yield
    finally:
        collector.reset(token)


def tensors_in(obj: Any, depth: int = 3):
    """The tensors in ``obj`` and in the tuples, lists and dicts it holds, ``depth`` levels down."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors_in(item, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item, depth - 1)


def _registered(module, name, value) -> None:
    # Runs for every registration in the process, so it must never raise. Only registrations
    # into a layer's modules count: transformers slices its ModuleList of layers every forward,
    # which registers each layer into a new, unwatched list.
    global _registrations
    ref = _watched.get(id(module))
    if ref is not None and ref() is module:
        _registrations += 1


class LayerParameters:
    """A layer's parameters that require grad, the inputs of its node besides its tensor arguments.

    The list of the layer's parameters is kept until a module or a parameter is registered
    into one of its modules (torch's global registration hooks: PEFT adding adapters, a
    parameter replaced by assignment), so a call costs one pass over the kept list for the
    ``requires_grad`` flags.
    """

    __slots__ = ("module", "version", "params", "checked", "fallback")

    def __init__(self, module: torch.nn.Module):
        global _registration_hooks
        if _registration_hooks is None:
            from torch.nn.modules import module as nn_module
            _registration_hooks = (nn_module.register_module_parameter_registration_hook(_registered),
                                   nn_module.register_module_module_registration_hook(_registered))
        self.module, self.version, self.params = module, None, ()
        self.checked = None     # the version whose recompute graph was searched for foreign leaves
        # torch's checkpoint from now on: the layer reaches a trainable tensor that is not one of its
        # inputs, or runs a reentrant checkpoint of its own
        self.fallback = False

    def trainable(self) -> list:
        if self.version != _registrations:
            _watched.update((id(m), weakref.ref(m)) for m in self.module.modules())
            self.params, self.version = tuple(self.module.parameters()), _registrations
        return [p for p in self.params if p.requires_grad]

    def forget(self) -> None:
        self.version = None


def checkpoint_layer(function: Callable, args: tuple, params: Sequence[torch.Tensor],
                     offloader: Optional[ActivationOffloader] = None,
                     key: Optional[Tuple[Hashable, int]] = None, watch: Optional[LayerParameters] = None) -> Any:
    """``function(*args)``, checkpointed; ``params``: the trainable parameters ``function`` uses
    (``LayerParameters.trainable()``), which get their gradients from the node; ``watch``: that
    ``LayerParameters``, whose ``fallback`` a backward may set. With an offloader,
    large tensor inputs wait in host memory under ``key`` (``offloader.prefetch(*key)`` starts
    their copy back)."""
    slots = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    tensors = tuple(args[i] for i in slots)
    if not params and not any(t.requires_grad for t in tensors):
        return function(*args)      # nothing to differentiate: autograd saves nothing either
    # the job keeps the non-tensor arguments only: tensors are saved (or parked) by the node
    job = _Job(function, tuple(None if i in slots else a for i, a in enumerate(args)), slots, offloader, key)
    job.params, job.watch = tuple(params), watch
    out = _LayerCheckpoint.apply(job, *tensors, *job.params)
    if job.structure is None:
        return out
    return job.structure.unflatten(list(out))


class _Job:
    """What the node's backward needs besides the saved tensors."""

    __slots__ = ("function", "args", "slots", "offloader", "key", "params", "watch", "parked", "structure",
                 "device", "autocast", "cpu_autocast", "cpu_rng", "device_rng")

    def __init__(self, function, args, slots, offloader, key):
        self.function, self.args, self.slots, self.offloader, self.key = function, args, slots, offloader, key
        self.structure = None
        self.parked: Tuple[Optional[ParkedTensor], ...] = ()

    def capture(self, tensors: tuple) -> None:
        device = tensors[0].device if tensors else torch.device("cpu")
        self.device = device
        self.autocast = _autocast_state(device.type)
        self.cpu_autocast = _autocast_state("cpu") if device.type != "cpu" else None
        self.cpu_rng = torch.get_rng_state()
        self.device_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def call(self, tensors) -> Any:
        args = list(self.args)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        return self.function(*args)

    def replay(self):
        """The forward's RNG and autocast state around the recompute; RNG restored after it."""
        return _Replay(self)


class _Replay:
    __slots__ = ("job", "cpu_rng", "device_rng", "contexts")

    def __init__(self, job: _Job):
        self.job = job

    def __enter__(self):
        job = self.job
        self.cpu_rng = torch.get_rng_state()
        torch.set_rng_state(job.cpu_rng)
        self.device_rng = None
        if job.device_rng is not None:
            self.device_rng = torch.cuda.get_rng_state(job.device)
            torch.cuda.set_rng_state(job.device_rng, job.device)
        self.contexts = (_autocast(job.device.type, job.autocast), _autocast("cpu", job.cpu_autocast))
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)
        torch.set_rng_state(self.cpu_rng)
        if self.device_rng is not None:
            torch.cuda.set_rng_state(self.device_rng, self.job.device)
        return False


def _autocast_state(device_type: str):
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type), torch.is_autocast_cache_enabled()


def _autocast(device_type: str, state):
    if state is None:
        return nullcontext()
    dtype, cache = state
    return torch.autocast(device_type, dtype=dtype, cache_enabled=cache)


class _LayerCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, job: _Job, *inputs: torch.Tensor):
        tensors = inputs[:len(job.slots)]          # the layer's tensor arguments, then its parameters
        job.capture(tensors)
        out = job.call(tensors)
        parked = tuple(job.offloader.park(t, *job.key) if job.offloader is not None else None for t in tensors)
        ctx.save_for_backward(*(t for t, p in zip(tensors, parked) if p is None))
        job.parked = parked
        ctx.job = job
        if isinstance(out, torch.Tensor):
            return out
        leaves, job.structure = tree_flatten(out)
        return tuple(leaves)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():     # the engine runs backward with grad enabled only for create_graph
            raise RuntimeError("sloth_plugins gradient checkpointing: create_graph=True (double backward) through "
                               "a checkpointed layer is not supported. For higher-order gradients use "
                               "SlothConfig(gradient_checkpointing='off', loss='off', kernels=False)")
        job, ctx.job = ctx.job, None
        if job is None:
            raise RuntimeError("sloth_plugins gradient checkpointing: a second backward through a checkpointed layer "
                               "(retain_graph=True) is not supported; the first one released its inputs")
        needs = ctx.needs_input_grad[1:1 + len(job.slots)]
        saved = iter(ctx.saved_tensors)
        inputs = []
        for parked, need in zip(job.parked, needs):
            t = (parked.take() if parked is not None else next(saved)).detach()
            inputs.append(t.requires_grad_(need))
        # the graph outlives its backward as long as the loss tensor lives: keep nothing in it
        job.parked = ()
        try:
            return _differentiate(job, inputs, needs, grads)
        except RuntimeError as error:
            if not _refused_by_a_nested_reentrant_checkpoint(error):
                raise
        return _differentiate_as_reentrant(job, inputs, needs, grads)


def _differentiate(job: _Job, inputs: list, needs: Sequence[bool], grads: tuple) -> tuple:
    """The recompute's gradients for the node's inputs, returned (none accumulated here)."""
    pairs = _recompute(job, inputs, grads)
    targets = tuple([t for t, need in zip(inputs, needs) if need] + list(job.params))
    watch, foreign = job.watch, ()
    if watch is not None and watch.checked != watch.version and pairs:
        watch.checked = watch.version
        foreign = _foreign_leaves([o for o, _ in pairs], targets)
        if foreign:
            watch.fallback = True
            warnings.warn(f"sloth_plugins gradient checkpointing: {type(watch.module).__name__} uses "
                          f"{len(foreign)} trainable tensor(s) that are neither its arguments nor its own "
                          f"parameters; they get their gradient in .grad this time, and the layer runs under "
                          f"torch's checkpoint from now on", stacklevel=3)
    # Returned, not accumulated here: the engine puts them in .grad, hands them to
    # autograd.grad, or drops those that backward(inputs=...) did not ask for.
    if pairs:
        # torch.autograd.grad(..., allow_unused=True) without its Python checks of each
        # tensor: a few Python calls per parameter per layer
        outputs, seeds = zip(*pairs)
        found = torch.autograd.Variable._execution_engine.run_backward(
            outputs, seeds, False, False, targets + foreign, True, False)
    else:
        found = (None,) * len(targets)
    for leaf, grad in zip(foreign, found[len(targets):]):
        if grad is not None:      # what the old nested backward did: accumulate in .grad
            leaf.grad = grad if leaf.grad is None else leaf.grad + grad
    found = iter(found[:len(targets)])
    input_grads = [next(found) if need else None for need in needs]
    return (None, *input_grads, *found)


def _refused_by_a_nested_reentrant_checkpoint(error: RuntimeError) -> bool:
    """A reentrant checkpoint inside the layer's own code (torch's ``use_reentrant=True``,
    DeepSpeed's ``checkpoint`` and ``non_reentrant_checkpoint``) refuses a backward that captures
    gradients, as ``_differentiate`` does: "... not compatible with .grad() ...". It refuses before
    it computes anything. Under an outer ``.grad()`` / ``backward(inputs=...)`` it refuses without
    sloth as well: that error stands."""
    return ".grad()" in str(error) and torch.autograd._is_checkpoint_valid()


def _differentiate_as_reentrant(job: _Job, inputs: list, needs: Sequence[bool], grads: tuple) -> tuple:
    """What a reentrant checkpoint does: a nested backward that accumulates the parameters'
    gradients in ``.grad``. Once per layer: it runs under torch's checkpoint from then on."""
    watch = job.watch
    if watch is not None:
        watch.fallback = True
    name = type(watch.module).__name__ if watch is not None else "a checkpointed layer"
    warnings.warn(f"sloth_plugins gradient checkpointing: {name} runs a reentrant checkpoint of its own "
                  f"(torch's use_reentrant=True or DeepSpeed's); its parameters get their gradient in .grad "
                  f"this time, as that checkpoint gives them, and the layer runs under torch's non-reentrant "
                  f"checkpoint from now on", stacklevel=3)
    pairs = _recompute(job, inputs, grads)
    if pairs:
        outputs, seeds = zip(*pairs)
        torch.autograd.backward(outputs, seeds)
    input_grads = [t.grad if need else None for t, need in zip(inputs, needs)]
    return (None, *input_grads, *(None,) * len(job.params))


def _recompute(job: _Job, inputs: list, grads: tuple) -> list:
    """The layer's forward again, with grad, under the forward's RNG and autocast state: its outputs
    to differentiate, each with the gradient that came for it."""
    with torch.enable_grad(), job.replay():
        out = job.call(inputs)
    outs = (out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]
    return [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]


def _foreign_leaves(outputs, targets) -> tuple:
    """The leaves requiring grad that the graph of ``outputs`` reaches, other than ``targets``."""
    known = {id(t) for t in targets}
    stack, seen, found = [o.grad_fn for o in outputs], set(), []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)      # an AccumulateGrad node
        if variable is not None:
            if id(variable) not in known:
                found.append(variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return tuple(found)
