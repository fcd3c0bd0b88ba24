"""The one-node layer checkpoint (``sloth_plugins.checkpointing.layer_node``) against plain autograd.

Exact in fp32 and under CPU bf16 autocast: the recompute runs the same ops on the same inputs.
The model-level parity of every checkpointing mode is in ``test_modes.py``.
"""
import functools
import os
import tempfile

import pytest
import torch

import sloth_plugins as sloth
from sloth_plugins.checkpointing import get_checkpoint_controller, layer_node
from sloth_plugins.checkpointing.offload import ActivationOffloader
from sloth_plugins.testing import tiny_model


class _Block(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x, gate=None, scale=1.0):
        h = self.dropout(torch.nn.functional.silu(self.up(x)))
        if gate is not None:
            h = h * gate
        y = self.down(h) * scale
        return y, None, "label"


def _run(block, x, gate, checkpointed, offloader=None, seed=3):
    torch.manual_seed(seed)
    if checkpointed:
        key = (1, 0) if offloader is not None else None
        y, none, label = layer_node.checkpoint_layer(block, (x, gate, 0.5), _params(block), offloader, key)
    else:
        y, none, label = block(x, gate, 0.5)
    assert none is None and label == "label"
    torch.manual_seed(seed + 1)        # the backward must not depend on the RNG at backward time
    (y.square().sum()).backward()
    if offloader is not None:
        # while the graph still lives (y holds it), its host buffers are back in the pool
        assert offloader.live_parked() == 0 and offloader.pool("cpu").stats().in_use_bytes == 0
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    return y.detach(), grads


def _params(block):
    return [p for p in block.parameters() if p.requires_grad]


def _inputs(x_grad, gate_grad):
    torch.manual_seed(1)
    x = torch.randn(4, 8, requires_grad=x_grad)
    gate = torch.rand(4, 16, requires_grad=gate_grad)
    return x, gate


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("x_grad,gate_grad", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("offload", [False, True])
def test_matches_plain_autograd(dropout, x_grad, gate_grad, offload):
    block = _Block(dropout)
    results = []
    for checkpointed in (False, True):
        x, gate = _inputs(x_grad, gate_grad)
        offloader = ActivationOffloader(min_bytes=0) if checkpointed and offload else None
        y, grads = _run(block, x, gate, checkpointed, offloader)
        results.append((y, grads, x.grad, gate.grad))
        if offloader is not None:
            assert offloader.parked_count == 2 and offloader.fetched_on_demand == 2   # no prefetch asked
    (y0, g0, dx0, dg0), (y1, g1, dx1, dg1) = results
    assert torch.equal(y0, y1)
    for name in g0:     # the parameters get gradients even when no input requires grad
        assert torch.equal(g0[name], g1[name]), name
    assert (dx0 is None) == (not x_grad) and (dx0 is None or torch.equal(dx0, dx1))
    assert (dg0 is None) == (not gate_grad) and (dg0 is None or torch.equal(dg0, dg1))


def test_recompute_runs_under_the_forwards_autocast():
    block = _Block()
    results = []
    for checkpointed in (False, True):
        x, gate = _inputs(True, False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if checkpointed:
                y = layer_node.checkpoint_layer(block, (x, gate, 1.0), _params(block))[0]
            else:
                y = block(x, gate, 1.0)[0]
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()      # outside autocast, as trainers do
        results.append((y.detach(), x.grad, block.up.weight.grad.clone()))
        block.zero_grad(set_to_none=True)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_prefetch_by_key_before_the_backward():
    block = _Block()
    offloader = ActivationOffloader(min_bytes=0)
    x, _ = _inputs(True, False)
    y = layer_node.checkpoint_layer(block, (x, None, 1.0), _params(block), offloader, ("gen", 7))[0]
    assert offloader.prefetch("gen", 7)
    y.sum().backward()
    assert offloader.prefetched == 1 and offloader.fetched_on_demand == 0 and x.grad is not None


@pytest.mark.parametrize("x_grad", [True, False])
def test_autograd_grad_and_backward_inputs_match_plain_autograd(x_grad):
    block = _Block(dropout=0.3)
    wanted = [block.down.weight, block.up.bias]
    results = []
    for checkpointed in (False, True):
        x, gate = _inputs(x_grad, True)
        torch.manual_seed(3)
        args = (x, gate, 1.0)
        y = layer_node.checkpoint_layer(block, args, _params(block))[0] if checkpointed else block(*args)[0]
        grads = torch.autograd.grad(y.square().sum(), wanted + [gate])
        assert all(p.grad is None for p in block.parameters())         # autograd.grad leaves .grad alone
        torch.manual_seed(3)
        y = layer_node.checkpoint_layer(block, args, _params(block))[0] if checkpointed else block(*args)[0]
        y.square().sum().backward(inputs=[block.up.weight, gate])
        assert block.down.weight.grad is None and (x.grad is None)
        results.append((*grads, block.up.weight.grad.clone(), gate.grad))
        block.zero_grad(set_to_none=True)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_create_graph_raises_a_clear_error():
    block = _Block()
    x, gate = _inputs(True, False)
    y = layer_node.checkpoint_layer(block, (x, gate, 1.0), _params(block))[0]
    with pytest.raises(RuntimeError, match="create_graph=True.*gradient_checkpointing='off'"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_a_layer_with_nothing_to_differentiate_is_not_checkpointed():
    block = _Block()
    block.requires_grad_(False)
    x, gate = _inputs(False, False)
    y = layer_node.checkpoint_layer(block, (x, gate, 1.0), _params(block))[0]
    assert y.grad_fn is None and not y.requires_grad


def test_layer_parameters_follow_flags_and_new_parameters():
    block = _Block()
    listed = layer_node.LayerParameters(block)

    def trainable():
        return [id(p) for p in listed.trainable()]

    assert trainable() == [id(p) for p in block.parameters()]
    block.up.requires_grad_(False)
    assert trainable() == [id(block.down.weight), id(block.down.bias)]
    block.down.weight = torch.nn.Parameter(torch.zeros(8, 16))          # replaced by assignment
    block.extra = torch.nn.Linear(2, 2)                                 # a module added (an adapter)
    assert trainable() == [id(p) for p in (block.down.weight, block.down.bias, block.extra.weight, block.extra.bias)]
    version = listed.version
    torch.nn.ModuleList([block, torch.nn.Linear(2, 2)])     # transformers' per-forward slice of its layers
    assert trainable() and listed.version == version        # was not listed again


def test_a_second_backward_through_the_layer_raises_a_clear_error():
    block = _Block()
    x, gate = _inputs(True, False)
    loss = layer_node.checkpoint_layer(block, (x, gate, 1.0), _params(block))[0].sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_usable_only_where_it_is_exact():
    block = _Block()
    assert layer_node.usable(functools.partial(block, scale=1.0), {})
    assert not layer_node.usable(block, {"scale": 1.0})
    trainable = torch.ones(4, 16, requires_grad=True)
    assert not layer_node.usable(functools.partial(block, gate=trainable), {})
    assert not layer_node.usable(functools.partial(block, gate=(trainable, None)), {})
    assert not layer_node.usable(functools.partial(block, gate={"gate": trainable}), {})
    assert not layer_node.usable(functools.partial(block, torch.ones(4, 8, requires_grad=True)), {})
    assert layer_node.usable(functools.partial(block, gate=trainable.detach()), {})


def _layer_nodes(model, ids) -> int:
    """How many one-node layer checkpoints the graph of a training loss holds."""
    loss = model(input_ids=ids, labels=ids).loss
    seen, stack, count = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "_LayerCheckpointBackward"
        stack.extend(next_node for next_node, _ in node.next_functions)
    loss.backward()
    return count


def test_the_controller_uses_one_node_per_layer_and_torch_under_distributed():
    import torch.distributed as dist

    model = tiny_model("llama", seed=0, layers=3, vocab_size=128)
    model.train()
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="offload"))
    ids = torch.randint(3, 128, (2, 8))
    assert _layer_nodes(model, ids) == 3
    get_checkpoint_controller(model).one_node = False
    assert _layer_nodes(model, ids) == 0
    get_checkpoint_controller(model).one_node = True
    store = tempfile.NamedTemporaryFile(delete=False)
    store.close()
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    try:
        assert _layer_nodes(model, ids) == 0
    finally:
        dist.destroy_process_group()
        if os.path.exists(store.name):
            os.unlink(store.name)


class _SharedScaleBlock(_Block):
    """A block that multiplies by a trainable tensor it does not own (a weight shared from outside)."""

    def __init__(self, shared):
        super().__init__()
        self.__dict__["shared"] = shared          # not registered: not among the block's parameters

    def forward(self, x, gate=None, scale=1.0):
        y, none, label = super().forward(x, gate, scale)
        return y * self.shared, none, label


def test_a_trainable_tensor_the_layer_does_not_own_gets_its_gradient_and_reroutes_the_layer():
    shared = torch.full((8,), 1.5, requires_grad=True)
    block = _SharedScaleBlock(shared)
    x, gate = _inputs(True, False)
    block(x, gate, 1.0)[0].square().sum().backward()
    expected = {"shared": shared.grad.clone(), "x": x.grad.clone(),
                **{n: p.grad.clone() for n, p in block.named_parameters()}}
    shared.grad = x.grad = None
    block.zero_grad(set_to_none=True)

    watch = layer_node.LayerParameters(block)
    y = layer_node.checkpoint_layer(block, (x, gate, 1.0), watch.trainable(), watch=watch)[0]
    with pytest.warns(UserWarning, match="neither its arguments nor its own parameters"):
        y.square().sum().backward()
    assert watch.fallback
    got = {"shared": shared.grad, "x": x.grad, **{n: p.grad for n, p in block.named_parameters()}}
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, msg=name)


def test_model_layers_reaching_a_foreign_tensor_go_to_torchs_checkpoint():
    ref, model = (tiny_model("llama", seed=0) for _ in range(2))
    for m in (ref, model):
        shared = torch.nn.Parameter(torch.full((m.config.hidden_size,), 0.9))
        m.shared_scale = shared       # registered on the model, used inside every layer's MLP
        for layer in m.model.layers:
            mlp_forward = layer.mlp.forward
            layer.mlp.forward = lambda h, f=mlp_forward, s=shared: f(h) * s
    sloth.patch(model, gradient_checkpointing="recompute")
    ids = torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    for step in range(2):
        grads = []
        for m in (ref, model):
            m.train().zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()
            grads.append({n: p.grad for n, p in m.named_parameters()})
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], msg=f"step {step}: {name}")
    assert all(p.fallback for p in get_checkpoint_controller(model).parameters)
    assert _layer_nodes(model, ids) == 0          # rerouted: no one-node checkpoint left
