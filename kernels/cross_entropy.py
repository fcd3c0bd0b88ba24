"""Cross-entropy of a linear head without materialising the [tokens x vocab] logits.

``fused_linear_cross_entropy(hidden, weight, labels)`` takes hidden states already aligned
with their targets (``hidden[i]`` predicts ``labels[i]``). Ignored tokens are dropped before
any matmul. Tokens are processed in chunks; for each chunk the logits are formed, the loss
summed in fp32, and the gradients of the hidden states (and of the weight, when it requires
grad) computed right away, so backward is a multiply by the incoming scalar.

Reduction follows Hugging Face's causal-LM contract: ``sum / num_items_in_batch`` when given
(gradient accumulation), else the mean over non-ignored tokens; all-ignored gives 0.
Logit soft-capping (Gemma 2/3) is ``cap * tanh(logits / cap)`` before the softmax.

In fp16 (the hidden states or the autocast dtype) the gradients are computed in backward instead,
with the incoming scalar folded in before anything is rounded to fp16: dlogits / divisor underflows
fp16 and a GradScaler's scale (65536) overflows it, so the forward-time gradient would be silently
wrong (``_cross_entropy_triton.py`` says more). The cost is a second pass of logits per chunk.

CUDA tensors take the Triton path (``_cross_entropy_triton.py``, same signature); the torch
function here is the reference that defines the semantics.

``chunked_cross_entropy`` is the generic variant for a head that is not a plain weight (a
LoRA-wrapped or quantised lm_head): each chunk is recomputed in backward instead.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._dispatch import use_triton
from ._loss_common import Divisor, auto_chunk_size, first_order_only


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is a class index in [0, vocab) or ``ignore_index``; otherwise an error, as
    ``F.cross_entropy`` gives (on CUDA a device-side assert: checked without a host sync)."""
    ok = ((labels >= 0) & (labels < vocab)) | (labels == ignore_index)
    torch._assert_async(ok.all(), f"cross-entropy labels must lie in [0, {vocab}) or equal ignore_index "
                                  f"({ignore_index})")


def _select_valid(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    labels = labels.reshape(-1)
    hidden = hidden.reshape(labels.shape[0], -1)
    idx = (labels != ignore_index).nonzero().squeeze(1)
    return hidden.index_select(0, idx), labels.index_select(0, idx)


def _softcap(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def _zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    # Keeps the autograd graph connected so backward runs and yields zero gradients.
    return sum((t.sum() * 0.0).float() for t in tensors)


def _chunks(hidden, weight, labels, divisor, softcap, chunk_size, want_h: bool, want_w: bool):
    """(loss sum, d(loss sum / divisor)/d hidden, the same for the weight in fp32), chunk by chunk."""
    n = hidden.shape[0]
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        h = hidden[start:start + chunk_size]
        y = labels[start:start + chunk_size]
        raw = (h @ weight.t()).float()
        logits = _softcap(raw, softcap)
        lse = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, y[:, None]).squeeze(1)
        loss_sum += (lse - target).sum()
        if not (want_h or want_w):
            continue
        g = torch.exp(logits - lse[:, None])
        g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
        if softcap is not None:
            g *= 1.0 - (logits / softcap) ** 2
        g = (g / divisor).to(hidden.dtype)
        if want_h:
            torch.matmul(g, weight, out=grad_h[start:start + chunk_size])
        if want_w:
            grad_w.addmm_(g.t().float(), h.float())
    return loss_sum, grad_h, grad_w


def half_range(hidden: torch.Tensor) -> bool:
    """fp16 anywhere in the head's math: its gradients are then computed in backward (module docstring)."""
    device_type = hidden.device.type
    return hidden.dtype == torch.float16 or (torch.is_autocast_enabled(device_type)
                                             and torch.get_autocast_dtype(device_type) == torch.float16)


class _FusedLinearCrossEntropyTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, softcap, chunk_size):
        ctx.deferred, ctx.weight_dtype = half_range(hidden), weight.dtype
        want_h, want_w = not ctx.deferred, weight.requires_grad and not ctx.deferred
        loss_sum, grad_h, grad_w = _chunks(hidden, weight, labels, divisor, softcap, chunk_size, want_h, want_w)
        if ctx.deferred:
            ctx.save_for_backward(hidden, weight, labels)
            device_type = hidden.device.type
            ctx.args = (divisor, softcap, chunk_size)
            ctx.autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        else:
            ctx.save_for_backward(grad_h, grad_w)
        return loss_sum / divisor

    @staticmethod
    def backward(ctx, grad_out):
        first_order_only()
        if ctx.deferred:       # the incoming scalar (a GradScaler's scale) in fp32, before anything is fp16
            hidden, weight, labels = ctx.saved_tensors
            divisor, softcap, chunk_size = ctx.args
            with torch.autocast(hidden.device.type, dtype=ctx.autocast or torch.float16, enabled=bool(ctx.autocast)):
                _, gh, gw = _chunks(hidden, weight, labels, divisor / grad_out.float(), softcap, chunk_size,
                                    ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            return gh, gw.to(ctx.weight_dtype) if gw is not None else None, None, None, None, None
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def _divisor(num_items_in_batch: Divisor, n_valid: int, device) -> Union[float, torch.Tensor]:
    if num_items_in_batch is None:
        return float(max(n_valid, 1))
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(device=device, dtype=torch.float32)
    return float(num_items_in_batch)


def fused_linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index=-100, softcap=None,
                                         num_items_in_batch: Divisor = None, chunk_size=None):
    h, y = _select_valid(hidden, labels, ignore_index)
    if h.shape[0] == 0:
        return _zero_loss(hidden, weight)
    divisor = _divisor(num_items_in_batch, h.shape[0], h.device)
    chunk = chunk_size or auto_chunk_size(h.shape[0], weight.shape[0], h.device)
    return _FusedLinearCrossEntropyTorch.apply(h, weight, y, divisor, softcap, chunk)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, softcap: Optional[float] = None,
                               num_items_in_batch: Divisor = None,
                               chunk_size: Optional[int] = None) -> torch.Tensor:
    check_labels(labels, weight.shape[0], ignore_index)
    if use_triton(hidden, weight):
        from ._cross_entropy_triton import fused_linear_cross_entropy_triton
        return fused_linear_cross_entropy_triton(hidden, weight, labels, ignore_index=ignore_index,
                                                 softcap=softcap, num_items_in_batch=num_items_in_batch,
                                                 chunk_size=chunk_size)
    return fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index=ignore_index,
                                                softcap=softcap, num_items_in_batch=num_items_in_batch,
                                                chunk_size=chunk_size)


def chunked_cross_entropy(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                          labels: torch.Tensor, vocab_size: int, *, ignore_index: int = -100,
                          softcap: Optional[float] = None, num_items_in_batch: Divisor = None,
                          chunk_size: Optional[int] = None) -> torch.Tensor:
    """Same contract, for any callable head; each chunk's logits are recomputed in backward."""
    check_labels(labels, vocab_size, ignore_index)
    h, y = _select_valid(hidden, labels, ignore_index)
    if h.shape[0] == 0:
        return _zero_loss(hidden)
    divisor = _divisor(num_items_in_batch, h.shape[0], h.device)
    chunk = chunk_size or auto_chunk_size(h.shape[0], vocab_size, h.device)

    def chunk_loss(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        logits = _softcap(head(hc).float(), softcap)
        return F.cross_entropy(logits, yc, reduction="sum")

    total = None
    for start in range(0, h.shape[0], chunk):
        hc, yc = h[start:start + chunk], y[start:start + chunk]
        part = checkpoint(chunk_loss, hc, yc, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss(hc, yc)
        total = part if total is None else total + part
    return total / divisor
