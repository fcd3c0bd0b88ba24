"""A decoder layer's checkpoint as one autograd node, with no hook per saved tensor.

torch's non-reentrant checkpoint runs the layer with grad enabled and a pair of saved-tensor
hooks around every tensor the layer saves, in the forward and again in the recompute: about
40 Python calls a tensor, a quarter of the host's Python in an 8B QLoRA step, which is
host-bound. Here the forward runs under ``no_grad`` (autograd records and saves nothing), one
node holds the layer's inputs (parked in host memory when offloading), and its backward runs
the forward again with grad and back-propagates through it, as torch's reentrant checkpoint
does. Unlike that one, the layer's parameters get gradients even when no input requires grad
(frozen embeddings under PEFT): a tensor that requires grad ("anchor") is always an input of
the node, so the node is in every graph that uses the layer's output.

``usable`` routes to torch's non-reentrant checkpoint what this does not cover:
torch.distributed runs (DDP's and FSDP's gradient hooks are proven with torch's checkpoint),
torch.compile tracing, trainable tensors bound in the layer's call (a partial's keywords or
positional arguments; the node's inputs are the call's own tensor arguments). ``torch.autograd.grad`` cannot
reach the parameters through a nested backward; it raises, as with torch's reentrant
checkpoint. The forward and the recompute run under the same autocast and RNG state, so they
compute the same values.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Hashable, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

from .checkpoint_offload import ActivationOffloader, ParkedTensor

_anchor: Optional[torch.Tensor] = None


def usable(function: Callable, kwargs: dict) -> bool:
    if kwargs or torch.compiler.is_compiling():
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    bound = (getattr(function, "args", ()), getattr(function, "keywords", {}))    # a partial's arguments
    return not any(t.requires_grad for t in tensors_in(bound))


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


def checkpoint_layer(function: Callable, args: tuple, offloader: Optional[ActivationOffloader] = None,
                     key: Optional[Tuple[Hashable, int]] = None) -> Any:
    """``function(*args)``, checkpointed; with an offloader, large tensor inputs wait in host memory
    under ``key`` (``offloader.prefetch(*key)`` starts their copy back)."""
    global _anchor
    if _anchor is None:
        _anchor = torch.empty(0, requires_grad=True)
    slots = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    # the job keeps the non-tensor arguments only: tensors are saved (or parked) by the node
    job = _Job(function, tuple(None if i in slots else a for i, a in enumerate(args)), slots, offloader, key)
    out = _LayerCheckpoint.apply(job, _anchor, *(args[i] for i in slots))
    if job.structure is None:
        return out
    return job.structure.unflatten(list(out))


class _Job:
    """What the node's backward needs besides the saved tensors."""

    __slots__ = ("function", "args", "slots", "offloader", "key", "parked", "requires_grad", "structure",
                 "device", "autocast", "cpu_autocast", "cpu_rng", "device_rng")

    def __init__(self, function, args, slots, offloader, key):
        self.function, self.args, self.slots, self.offloader, self.key = function, args, slots, offloader, key
        self.structure = None
        self.parked: Tuple[Optional[ParkedTensor], ...] = ()

    def capture(self, tensors: tuple) -> None:
        device = tensors[0].device if tensors else torch.device("cpu")
        self.device = device
        self.requires_grad = tuple(t.requires_grad for t in tensors)
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
    def forward(ctx, job: _Job, anchor: torch.Tensor, *tensors: torch.Tensor):
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
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("sloth_plugins gradient checkpointing supports .backward(), not torch.autograd.grad() "
                               "or backward(inputs=...): the checkpointed layers' parameters get their gradients "
                               "in .grad. Use SlothConfig(gradient_checkpointing='off') for autograd.grad.")
        job, ctx.job = ctx.job, None
        if job is None:
            raise RuntimeError("sloth_plugins gradient checkpointing: a second backward through a checkpointed layer "
                               "(retain_graph=True) is not supported; the first one released its inputs")
        saved = iter(ctx.saved_tensors)
        inputs = []
        for parked, needs in zip(job.parked, job.requires_grad):
            t = (parked.take() if parked is not None else next(saved)).detach()
            inputs.append(t.requires_grad_(needs))
        # the graph outlives its backward as long as the loss tensor lives: keep nothing in it
        job.parked = ()
        with torch.enable_grad(), job.replay():
            out = job.call(inputs)
        outs = (out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *(t.grad if needs else None for t, needs in zip(inputs, job.requires_grad)))
