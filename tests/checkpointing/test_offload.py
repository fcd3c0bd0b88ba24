"""The offloader and its host pool (``sloth_plugins.checkpointing.offload``)."""
import gc
import warnings

import pytest
import torch

# this folder's helpers.py, loaded by conftest.py
from checkpointing_helpers import VARIANTS, _assert_identical, _model, _steps
from torch.utils.checkpoint import checkpoint

import sloth_plugins as sloth
from sloth_plugins.checkpointing import get_checkpoint_controller
from sloth_plugins.checkpointing.offload import ActivationOffloader, HostBufferPool

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
    from sloth_plugins.checkpointing import offload as checkpoint_offload

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
