"""bitsandbytes 4-bit (NF4 / FP4) dequantization, bit for bit equal to bitsandbytes' CUDA kernel.

Layout (bitsandbytes 0.50, ``quantize_4bit``): the weight is flattened row-major; element ``i``
sits in byte ``i // 2``, the even element in the high nibble; its scale is ``absmax[i // blocksize]``
(blocks run over the flat tensor, across row ends). The value is ``code[nibble] * absmax`` in fp32,
rounded once to the output dtype. With double quantization (``compress_statistics``) absmax is
itself 8-bit: ``absmax = nested_code[absmax_u8[b]] * nested_absmax[b // nested_blocksize]``
(one fp32 multiply) ``+ offset`` (one fp32 add, never fused into an FMA).

The 16-value tables are bitsandbytes' device lookup tables. FP4 code 8 decodes to -0.0 on CUDA
(``0.0 * sign``); ``get_4bit_type``'s table (and the CPU C++ kernel) give +0.0 there. We follow CUDA.

No bitsandbytes import here: :class:`QuantState4bit` is a plain description built from any
object with bitsandbytes ``QuantState``'s fields (:meth:`QuantState4bit.from_bnb`).
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from ._dispatch import use_triton

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_FP4_MAGNITUDES = (0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25)
FP4_CODE = _FP4_MAGNITUDES + tuple(-v for v in _FP4_MAGNITUDES)  # index 8 is -0.0

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QuantState4bit:
    """What dequantization needs from a bitsandbytes ``QuantState``.

    ``absmax`` is fp32 ``[blocks]``, or uint8 when double-quantized (then ``nested_absmax``,
    ``nested_code`` (256 fp32), ``nested_blocksize`` and ``offset`` (0-d fp32 tensor) are set).
    ``code`` is informational: like bitsandbytes' kernels we decode with the table of ``quant_type``.
    """
    absmax: torch.Tensor
    blocksize: int
    dtype: torch.dtype
    shape: tuple
    quant_type: str
    code: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: Optional[int] = None
    offset: Optional[torch.Tensor] = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    # cached_property: a frozen dataclass's fields never change, so neither do these
    @functools.cached_property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_bnb(cls, qs) -> "QuantState4bit":
        """From a ``bitsandbytes.functional.QuantState`` (duck-typed: no bitsandbytes import).
        The same object again while its scale tensors are the same ones: a training step asks
        for every weight's state several times, and the kernel arguments are cached on it."""
        entry = _from_bnb_cache.get(id(qs))
        state2 = getattr(qs, "state2", None)
        if entry is not None:
            ref, absmax, absmax2, result = entry
            if ref() is qs and qs.absmax is absmax and (state2.absmax if state2 is not None else None) is absmax2:
                return result
        result = cls._from_bnb(qs, state2)
        key = id(qs)
        ref = weakref.ref(qs, lambda _r, key=key, cache=_from_bnb_cache: cache.pop(key, None))
        _from_bnb_cache[key] = (ref, qs.absmax, state2.absmax if state2 is not None else None, result)
        return result

    @classmethod
    def _from_bnb(cls, qs, state2) -> "QuantState4bit":
        nested = state2 is not None
        offset = qs.offset if nested else None
        if nested and not torch.is_tensor(offset):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=qs.absmax.device)
        return cls(
            absmax=qs.absmax, blocksize=int(qs.blocksize), dtype=qs.dtype, shape=tuple(qs.shape),
            quant_type=qs.quant_type, code=qs.code,
            nested_absmax=state2.absmax if nested else None,
            nested_code=state2.code if nested else None,
            nested_blocksize=int(state2.blocksize) if nested else None,
            offset=offset,
        )

    @functools.cached_property
    def triton_args(self) -> tuple:
        """(code table, absmax, nested_absmax, nested_code, offset, nested_blocksize) as the Triton
        kernel reads them (fp32, flat; placeholders when not double-quantized). Validates once."""
        self.validate()
        code = code_table(self.quant_type, self.absmax.device)
        if self.nested:
            return (code, self.absmax.reshape(-1), self.nested_absmax.reshape(-1).float(), self.nested_code.float(),
                    self.offset.reshape(1).float(), self.nested_blocksize)
        absmax = self.absmax.reshape(-1).float()
        return code, absmax, absmax, absmax, absmax, 1

    def validate(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        for name, size in (("blocksize", self.blocksize), ("nested_blocksize", self.nested_blocksize)):
            if size is not None and (size < 2 or size & (size - 1)):
                raise ValueError(f"{name} must be a power of two >= 2, got {size}")
        if self.nested and (self.nested_code is None or self.offset is None or self.nested_blocksize is None):
            raise ValueError("double-quantized state needs nested_code, nested_blocksize and offset")


_from_bnb_cache: dict = {}   # id(bnb QuantState) -> (weakref, absmax, nested absmax, QuantState4bit)
_code_cache: dict = {}


def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry fp32 decode table bitsandbytes' CUDA kernel uses, cached per device."""
    key = (quant_type, torch.device(device))
    table = _code_cache.get(key)
    if table is None:
        values = NF4_CODE if quant_type == "nf4" else FP4_CODE
        table = torch.tensor(values, dtype=torch.float32, device=device)
        _code_cache[key] = table
    return table


_buffers: dict = {}
_views: dict = {}   # (buffer key, shape) -> the buffer viewed as that shape
_holds: dict = {}   # buffer key -> what the buffer holds now (see _contents)


def _buffer_key(device, dtype: torch.dtype, numel: int, slot) -> tuple:
    return torch.device(device), dtype, int(numel), slot


def dequant_buffer(device: torch.device, dtype: torch.dtype, numel: int, slot=None) -> torch.Tensor:
    """A flat scratch tensor reused for every weight of this (device, dtype, numel, slot).

    One layer is dequantized at a time on one stream, so a buffer is free again as soon as the
    matmul that reads it has been queued. Never keep a reference to it.
    """
    key = _buffer_key(device, dtype, numel, slot)
    buf = _buffers.get(key)
    if buf is None:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _buffers[key] = buf
    return buf


def _buffer_view(key: tuple, shape: tuple) -> torch.Tensor:
    view = _views.get((key, shape))
    if view is None:
        view = dequant_buffer(*key).view(shape)
        _views[(key, shape)] = view
    return view


def clear_dequant_buffers() -> None:
    _buffers.clear()
    _views.clear()
    _holds.clear()


def _contents(packed: torch.Tensor, state: "QuantState4bit") -> tuple:
    """Identifies a dequantized weight: its scales tensor object (a weak reference: callers hand
    us a fresh ``.data`` view of the packed bytes every call, but bitsandbytes keeps one absmax
    tensor per weight, and a new tensor that reuses a dead one's id or memory never matches),
    where the bytes and scales live and their version counters (an in-place write bumps them).
    Base weights are frozen; a sharded engine may free and re-gather them between forward and
    backward, but the bytes it gathers back are the same."""
    scales = state.absmax
    return (weakref.ref(scales), packed.data_ptr(), packed._version, scales.data_ptr(), scales._version)


def _holds_already(key, contents: tuple) -> bool:
    held = _holds.get(key)
    return held is not None and held[0]() is contents[0]() and held[1:] == contents[1:]


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    # quant_storage may be bf16/fp32 (FSDP); the bytes are what count.
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _prepare_out(state: QuantState4bit, dtype: torch.dtype, device, out: Optional[torch.Tensor],
                 reuse_buffer: bool) -> torch.Tensor:
    n = state.numel
    if out is None:
        if reuse_buffer:
            return dequant_buffer(device, dtype, n).view(state.shape)
        return torch.empty(state.shape, dtype=dtype, device=device)
    if out.dtype != dtype or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of {n} elements")
    return out.view(state.shape)


def absmax_fp32_reference(state: QuantState4bit) -> torch.Tensor:
    """Per-block fp32 scales, undoing double quantization the way bitsandbytes does."""
    if not state.nested:
        return state.absmax.float()
    q = state.absmax.reshape(-1).long()
    nested = state.nested_absmax.float()
    scale2 = nested.repeat_interleave(state.nested_blocksize)[: q.numel()]
    absmax = state.nested_code.float()[q] * scale2
    return absmax + state.offset.float()


def dequantize_4bit_reference(packed: torch.Tensor, state: QuantState4bit, dtype: Optional[torch.dtype] = None,
                              out: Optional[torch.Tensor] = None, reuse_buffer: bool = False) -> torch.Tensor:
    state.validate()
    dtype = dtype or state.dtype
    n, bs = state.numel, state.blocksize
    data = _packed_bytes(packed)
    nibbles = torch.stack((data >> 4, data & 15), dim=1).reshape(-1)[:n].long()
    values = code_table(state.quant_type, packed.device)[nibbles]
    blocks = -(-n // bs)
    values = torch.nn.functional.pad(values, (0, blocks * bs - n)).view(blocks, bs)
    result = (values * absmax_fp32_reference(state)[:blocks, None]).reshape(-1)[:n]
    dest = _prepare_out(state, dtype, packed.device, out, reuse_buffer)
    dest.copy_(result.view(state.shape))
    return dest


def dequantize_4bit(packed: torch.Tensor, state: QuantState4bit, dtype: Optional[torch.dtype] = None,
                    out: Optional[torch.Tensor] = None, reuse_buffer: bool = False, slot=None) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight to ``dtype`` (default ``state.dtype``), shape ``state.shape``.

    ``out``: write there. ``reuse_buffer``: write into the shared per-(device, dtype, numel)
    scratch buffer (see :func:`dequant_buffer`); with a ``slot`` (any hashable: the weight's
    role) the buffer is that slot's, and when it still holds this very weight nothing is
    recomputed. Equal bit for bit to bitsandbytes' CUDA ``dequantize_4bit`` when dequantizing
    to the quantized dtype.
    """
    dtype = dtype or state.dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dequantize_4bit supports {_SUPPORTED_DTYPES}, got {dtype}")
    if reuse_buffer and slot is not None and out is None:
        key = _buffer_key(packed.device, dtype, state.numel, slot)
        contents = _contents(packed, state)
        buf = _buffer_view(key, state.shape)
        if _holds_already(key, contents):
            return buf
        _holds.pop(key, None)
        result = dequantize_4bit(packed, state, dtype, out=buf)
        _holds[key] = contents
        return result
    if use_triton(packed):
        from ._nf4_triton import dequantize_4bit_triton
        return dequantize_4bit_triton(packed, state, _prepare_out(state, dtype, packed.device, out, reuse_buffer))
    return dequantize_4bit_reference(packed, state, dtype, out=out, reuse_buffer=reuse_buffer)
