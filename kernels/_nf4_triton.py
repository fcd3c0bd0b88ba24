"""Triton NF4/FP4 dequantization (see nf4.py for the bit layout and the rounding contract).

A leaf: ``nf4.dequantize_4bit`` decides when to come here and prepares the output.

One program handles BLOCK consecutive output elements: it gathers their bytes (each byte is
read by its two elements; the reads coalesce), decodes the nibble through the 16-entry table,
scales by the block's absmax in fp32 and rounds once at the store. Double-quantized absmax is
decoded in the same pass. FMA contraction is switched off for the launch so the nested
``code * scale + offset`` rounds twice, as bitsandbytes does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _dequant_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_elements,
                         nested_absmax_ptr, nested_code_ptr, offset_ptr,
                         BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                         NESTED: tl.constexpr, ROUND_TO_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where((offs % 2) == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = offs // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        scale = scale * tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    result = value * scale
    if ROUND_TO_BF16:
        # Round-to-nearest-even by hand: the interpreter's float->bf16 cast truncates, the GPU's
        # rounds; integer rounding gives the GPU's answer on both. out_ptr is the int16 view.
        bits = result.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(result != result, 0x7FC0, rounded)
        tl.store(out_ptr + offs, rounded.to(tl.int16), mask=mask)
    else:
        tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_4bit_triton(packed: torch.Tensor, state, dest: torch.Tensor) -> torch.Tensor:
    """Dequantize ``packed`` (its ``nf4.QuantState4bit`` is ``state``) into ``dest`` (contiguous,
    ``state.shape``, the output dtype; ``nf4.dequantize_4bit`` prepares it) and return it."""
    code, absmax, nested_absmax, nested_code, offset, nested_blocksize = state.triton_args
    n = state.numel
    if n >= 2**31 - _BLOCK:
        raise ValueError(f"dequantize_4bit_triton uses int32 offsets; {n} elements is too many")
    # the kernel reads bytes from the base pointer: any contiguous uint8 shape will do as it is;
    # other quant_storage dtypes (bf16/fp32 under FSDP) are viewed as their bytes
    data = packed if packed.dtype == torch.uint8 and packed.is_contiguous() else packed.reshape(-1).view(torch.uint8)
    if data.numel() * 2 < n:
        raise ValueError(f"packed weight has {data.numel()} bytes, {n} elements need {(n + 1) // 2}")
    to_bf16 = dest.dtype == torch.bfloat16
    _dequant_4bit_kernel[(triton.cdiv(n, _BLOCK),)](
        data, absmax, code, dest.view(torch.int16) if to_bf16 else dest, n, nested_absmax, nested_code, offset,
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=nested_blocksize, NESTED=state.nested,
        ROUND_TO_BF16=to_bf16, BLOCK=_BLOCK, num_warps=4, enable_fp_fusion=False)
    return dest
