"""Triton fast path of the fused linear cross-entropy (contract: ``cross_entropy.py``).

Per chunk of valid tokens:
  1. ``logits = h @ W^T`` by cuBLAS, in the model dtype (as Hugging Face computes it);
  2. one Triton program per row finds the log-sum-exp online over vocab blocks in fp32,
     writes the row's loss, then overwrites the row's logits with d(loss)/d(logits);
  3. ``grad_h = dlogits @ W`` and, for a trainable head, ``grad_W += dlogits^T @ h``.
Only one chunk of logits ever exists. The whole computation is a ``torch.library`` custom op:
torch.compile sees one opaque node, and its backward is a multiply by the incoming scalar.

fp16 (``deferred``): dlogits / divisor underflows fp16 (a 1e-5 probability over 4096 tokens is below
its smallest subnormal) and a GradScaler's incoming 65536 overflows it. So in fp16 the forward
computes the loss only and the backward runs the same op again with the incoming scalar folded into
the divisor: dlogits = (p - y) * grad / divisor, in fp32, rounded to fp16 once — what autograd gives
the model's own loss under loss scaling — at the cost of a second ``h @ W^T`` per chunk.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._loss_common import Divisor, auto_chunk_size, first_order_only

# Vocab elements a program handles per step; tests lower it to exercise the ragged last block.
_MAX_BLOCK = 4096
# Bytes of one chunk of logits (model dtype). A trainable head already costs an fp32 grad_W
# accumulator, so there larger chunks (fewer accumulation passes) are worth their memory.
_LOGITS_BYTES = 512 * 2**20
_LOGITS_BYTES_TRAINABLE_HEAD = 1024 * 2**20
# Bytes of the half-precision temporary of one vocab slice of dlogits^T @ h.
_GRAD_W_SLICE_BYTES = 128 * 2**20


@triton.jit
def _tanh(x):
    # No tanh in core Triton. The exp form loses relative accuracy near 0, where the odd
    # Taylor polynomial is exact to ~1e-9 (|x| < 1/8).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    far = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    near = ax * (1.0 - x2 * (0.3333333333333333 - x2 * (0.13333333333333333 - x2 * 0.05396825396825397)))
    t = tl.where(ax < 0.125, near, far)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, row_stride, labels_ptr, losses_ptr, divisor_ptr, divisor_value,
                               softcap, vocab,
                               HAS_SOFTCAP: tl.constexpr, DIVISOR_FROM_PTR: tl.constexpr,
                               WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row)
    offsets = tl.arange(0, BLOCK)

    running_max = float("-inf")
    running_sum = 0.0
    target = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        mask = cols < vocab
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        # Picking the target inside the sweep never reads outside the row, whatever the label.
        target += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    # Never form lse = max + log(sum) itself: at |logits| ~ 1e3 its fp32 rounding (~1e-4) would
    # become the relative error of every probability.
    tl.store(losses_ptr + row, (running_max - target) + tl.log(running_sum))

    if WRITE_GRAD:
        if DIVISOR_FROM_PTR:
            divisor = tl.load(divisor_ptr).to(tl.float32)
        else:
            divisor = divisor_value
        scale = 1.0 / divisor
        inv_sum = 1.0 / running_sum
        for start in range(0, vocab, BLOCK):
            cols = start + offsets
            mask = cols < vocab
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            grad = tl.exp(z - running_max) * inv_sum
            grad = tl.where(cols == label, grad - 1.0, grad)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - t * t)
            tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor,
                        divisor: Optional[torch.Tensor], divisor_value: float, softcap: Optional[float],
                        write_grad: bool) -> None:
    """Per-row fp32 losses into ``losses``; with ``write_grad``, ``logits`` becomes dloss/dlogits / divisor."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    assert logits.stride(1) == 1 and labels.dtype == torch.int64 and losses.dtype == torch.float32
    block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
    _cross_entropy_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, losses, divisor if divisor is not None else losses,
        float(divisor_value), float(softcap) if softcap is not None else 1.0, vocab,
        HAS_SOFTCAP=softcap is not None, DIVISOR_FROM_PTR=divisor is not None, WRITE_GRAD=write_grad,
        BLOCK=block, num_warps=8 if block >= 2048 else 4)


class _WeightGradAccumulator:
    """``sum_c dlogits_c^T @ h_c`` over token chunks, summed in fp32, returned in the weight's dtype.

    A half-precision head gets an fp32 accumulator filled one vocab slice at a time, so the
    only half-precision temporary is one slice of one chunk's product; the last chunk adds and
    casts in the same step. One chunk, or an fp32 head, needs no separate accumulator.
    """

    def __init__(self, weight: torch.Tensor, n_chunks: int):
        self.shape, self.dtype, self.n_chunks = weight.shape, weight.dtype, n_chunks
        self.seen = 0
        self.result: Optional[torch.Tensor] = None
        self._acc: Optional[torch.Tensor] = None

    def add(self, dlogits: torch.Tensor, h: torch.Tensor) -> None:
        first, last = self.seen == 0, self.seen == self.n_chunks - 1
        self.seen += 1
        if first and last:
            self.result = torch.mm(dlogits.t(), h)
            return
        if self.dtype == torch.float32:
            if first:
                self.result = torch.mm(dlogits.t(), h)
            else:
                self.result.addmm_(dlogits.t(), h)
            return
        if first:
            self._acc = torch.empty(self.shape, dtype=torch.float32, device=h.device)
        if last:
            self.result = torch.empty(self.shape, dtype=self.dtype, device=h.device)
        vocab = self.shape[0]
        step = max(1, _GRAD_W_SLICE_BYTES // (h.shape[1] * h.element_size()))
        for start in range(0, vocab, step):
            part = torch.mm(dlogits[:, start:start + step].t(), h)
            acc = self._acc[start:start + step]
            if first:
                acc.copy_(part)
            elif last:
                torch.add(acc, part, out=self.result[start:start + step])
            else:
                acc.add_(part)
        if last:
            self._acc = None


def _rows_per_chunk(n_valid: int, vocab: int, logit_bytes: int, device: torch.device, trainable_head: bool) -> int:
    budget = _LOGITS_BYTES_TRAINABLE_HEAD if trainable_head else _LOGITS_BYTES
    rows = auto_chunk_size(n_valid, vocab, device, bytes_per_logit=logit_bytes, max_bytes=budget)
    # Same number of chunks, evened out: no small last chunk that leaves the GPU half idle.
    return math.ceil(n_valid / math.ceil(n_valid / rows))


def _forward_with_grads(hidden, weight, labels, divisor, divisor_value, ignore_index, softcap, chunk_size,
                        grad_hidden, grad_weight):
    n_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    valid = (labels != ignore_index).nonzero().squeeze(1)
    n_valid = valid.numel()
    all_valid = n_valid == n_tokens
    empty = hidden.new_empty(0)
    if not grad_hidden:
        grad_h = empty
    elif all_valid:
        grad_h = torch.empty_like(hidden)
    else:
        grad_h = torch.zeros_like(hidden)  # ignored tokens get exactly zero
    if n_valid == 0:
        grad_w = torch.zeros_like(weight) if grad_weight else weight.new_empty(0)
        return hidden.new_zeros((), dtype=torch.float32), grad_h, grad_w

    y = labels if all_valid else labels.index_select(0, valid)
    if divisor is None and divisor_value is None:
        divisor_value = float(n_valid)
    chunk = chunk_size or _rows_per_chunk(n_valid, vocab, weight.element_size(), hidden.device, grad_weight)
    chunk = min(chunk, n_valid)
    n_chunks = math.ceil(n_valid / chunk)

    logits_buffer = torch.empty((chunk, vocab), dtype=weight.dtype, device=hidden.device)
    h_buffer = None if all_valid else torch.empty((chunk, hidden_size), dtype=hidden.dtype, device=hidden.device)
    grad_h_buffer = torch.empty_like(h_buffer) if grad_hidden and not all_valid else None
    losses = torch.empty(n_valid, dtype=torch.float32, device=hidden.device)
    grad_w_acc = _WeightGradAccumulator(weight, n_chunks) if grad_weight else None
    write_grad = grad_hidden or grad_weight

    for start in range(0, n_valid, chunk):
        stop = min(start + chunk, n_valid)
        rows = stop - start
        if all_valid:
            h = hidden[start:stop]
        else:
            h = torch.index_select(hidden, 0, valid[start:stop], out=h_buffer[:rows])
        logits = logits_buffer[:rows]
        torch.mm(h, weight.t(), out=logits)
        cross_entropy_rows_(logits, y[start:stop], losses[start:stop], divisor,
                            divisor_value if divisor_value is not None else 1.0, softcap, write_grad)
        if grad_hidden:
            if all_valid:
                torch.mm(logits, weight, out=grad_h[start:stop])
            else:
                torch.mm(logits, weight, out=grad_h_buffer[:rows])
                grad_h.index_copy_(0, valid[start:stop], grad_h_buffer[:rows])
        if grad_w_acc is not None:
            grad_w_acc.add(logits, h)

    loss = losses.sum() / (divisor if divisor is not None else divisor_value)
    grad_w = grad_w_acc.result if grad_w_acc is not None else weight.new_empty(0)
    return loss, grad_h, grad_w


@torch.library.custom_op("sloth::fused_linear_cross_entropy", mutates_args=())
def _fused_linear_cross_entropy_op(
        hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, divisor: Optional[torch.Tensor],
        divisor_value: Optional[float], ignore_index: int, softcap: Optional[float], chunk_size: Optional[int],
        grad_hidden: bool, grad_weight: bool, deferred: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, d loss/d hidden, d loss/d weight); a gradient not asked for is an empty tensor.
    ``deferred``: the loss only, the gradients computed in backward (fp16)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _forward_with_grads(hidden, weight, labels, divisor, divisor_value, ignore_index, softcap,
                                   chunk_size, grad_hidden and not deferred, grad_weight and not deferred)


@_fused_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, divisor, divisor_value, ignore_index, softcap, chunk_size, grad_hidden, grad_weight,
      deferred):
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_h = torch.empty_like(hidden) if grad_hidden and not deferred else hidden.new_empty(0)
    grad_w = torch.empty_like(weight) if grad_weight and not deferred else weight.new_empty(0)
    return loss, grad_h, grad_w


def _setup_context(ctx, inputs, output):
    _loss, grad_h, grad_w = output
    ctx.mark_non_differentiable(grad_h, grad_w)
    ctx.set_materialize_grads(False)  # no zero-filled V x H tensor for the unused outputs
    ctx.has_grad_hidden, ctx.has_grad_weight = inputs[8], inputs[9]
    ctx.deferred = inputs[10]
    if ctx.deferred:
        hidden, weight, labels, divisor, divisor_value, ignore_index, softcap, chunk_size = inputs[:8]
        ctx.save_for_backward(hidden, weight, labels, divisor)
        ctx.args = (divisor_value, ignore_index, softcap, chunk_size)
    else:
        ctx.save_for_backward(grad_h, grad_w)


def _backward(ctx, grad_loss, _grad_h_unused, _grad_w_unused):
    first_order_only()
    nones = (None,) * 9
    if grad_loss is None:
        return (None, None) + nones
    if ctx.deferred:
        return _deferred_backward(ctx, grad_loss) + nones
    grad_h, grad_w = ctx.saved_tensors
    gh = grad_h * grad_loss.to(grad_h.dtype) if ctx.has_grad_hidden and ctx.needs_input_grad[0] else None
    gw = grad_w * grad_loss.to(grad_w.dtype) if ctx.has_grad_weight and ctx.needs_input_grad[1] else None
    return (gh, gw) + nones


def _deferred_backward(ctx, grad_loss):
    hidden, weight, labels, divisor = ctx.saved_tensors
    divisor_value, ignore_index, softcap, chunk_size = ctx.args
    if divisor is None:
        divisor = (torch.tensor(divisor_value, dtype=torch.float32, device=hidden.device) if divisor_value is not None
                   else (labels != ignore_index).sum().clamp(min=1).float())
    want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    _loss, gh, gw = _fused_linear_cross_entropy_op(
        hidden, weight, labels, divisor / grad_loss.float(), None, ignore_index, softcap, chunk_size,
        want_h, want_w, False)
    return (gh if want_h else None), (gw if want_w else None)


_fused_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor):
    # The op runs with autocast off, so apply here what autocast would do to the head's matmul.
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    return hidden.to(dtype), weight.to(dtype)


def fused_linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                      ignore_index: int = -100, softcap: Optional[float] = None,
                                      num_items_in_batch: Divisor = None,
                                      chunk_size: Optional[int] = None) -> torch.Tensor:
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must hold integer class indices, got {labels.dtype}")
    hidden, weight = _compute_dtype(hidden, weight)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(torch.int64).contiguous()
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {hidden.shape[0]} hidden states")
    divisor, divisor_value = None, None
    if isinstance(num_items_in_batch, torch.Tensor):
        # Read on the device by the kernel: no host sync.
        divisor = num_items_in_batch.detach().to(device=hidden.device, dtype=torch.float32).reshape(())
    elif num_items_in_batch is not None:
        divisor_value = float(num_items_in_batch)
    grad_enabled = torch.is_grad_enabled()
    loss, _grad_h, _grad_w = _fused_linear_cross_entropy_op(
        hidden, weight, labels, divisor, divisor_value, int(ignore_index),
        None if softcap is None else float(softcap), None if chunk_size is None else int(chunk_size),
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad, hidden.dtype == torch.float16)
    return loss
