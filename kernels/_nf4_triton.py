"""Triton NF4/FP4 dequantization (see nf4.py for the bit layout and the rounding contract).

One program handles a run of whole quantization blocks as a [blocks, bytes] tile: each byte is
read once and decoded into its two nibbles through the 16-entry table, each block's scale is
read (and, when double-quantized, decoded) once, and the two halves are interleaved into the
[blocks, blocksize] output tile, scaled in fp32 and rounded once at the store. FMA contraction is switched off for the launch so the nested
``code * scale + offset`` rounds twice, as bitsandbytes does.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._dispatch import interpreting
from ._tuning import measured_choice, row_bucket
from .nf4 import QuantState4bit, _packed_bytes, _prepare_out, code_table

# (output elements per program, warps); the first is the default off the GPU. The output does
# not depend on the choice: every element is decoded the same way.
_LAUNCH_SETTINGS = ((4096, 8), (2048, 4), (8192, 8), (16384, 16), (4096, 4))


@triton.jit
def _dequant_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_elements, n_blocks,
                         nested_absmax_ptr, nested_code_ptr, offset_ptr,
                         BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                         NESTED: tl.constexpr, ROUND_TO_BF16: tl.constexpr, ROWS: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2
    blocks = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    block_ok = blocks < n_blocks
    byte_offs = blocks[:, None].to(tl.int64) * HALF + tl.arange(0, HALF)[None, :]
    byte_ok = block_ok[:, None] & (byte_offs * 2 < n_elements)
    byte = tl.load(packed_ptr + byte_offs, mask=byte_ok, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4), mask=byte_ok, other=0.0)
    low = tl.load(code_ptr + (byte & 15), mask=byte_ok, other=0.0)
    if NESTED:
        q = tl.load(absmax_ptr + blocks, mask=block_ok, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=block_ok, other=0.0)
        scale = scale * tl.load(nested_absmax_ptr + blocks // NESTED_BLOCKSIZE, mask=block_ok, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blocks, mask=block_ok, other=0.0)
    # the even element is the high nibble: interleaving puts it first
    result = tl.interleave(high * scale[:, None], low * scale[:, None])
    offs = blocks[:, None].to(tl.int64) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    mask = block_ok[:, None] & (offs < n_elements)
    if ROUND_TO_BF16:
        # Round-to-nearest-even by hand: the interpreter's float->bf16 cast truncates, the GPU's
        # rounds; integer rounding gives the GPU's answer on both. out_ptr is the int16 view.
        bits = result.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(result != result, 0x7FC0, rounded)
        tl.store(out_ptr + offs, rounded.to(tl.int16), mask=mask)
    else:
        tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState4bit, dtype: torch.dtype,
                           out: Optional[torch.Tensor] = None, reuse_buffer: bool = False) -> torch.Tensor:
    state.validate()
    n = state.numel
    data = _packed_bytes(packed)
    if data.numel() * 2 < n:
        raise ValueError(f"packed weight has {data.numel()} bytes, {n} elements need {(n + 1) // 2}")
    dest = _prepare_out(state, dtype, packed.device, out, reuse_buffer)
    code = code_table(state.quant_type, packed.device)
    if state.nested:
        absmax = state.absmax.reshape(-1)
        nested_absmax = state.nested_absmax.reshape(-1).float()
        nested_code = state.nested_code.float()
        offset = state.offset.reshape(1).float()
        nested_blocksize = state.nested_blocksize
    else:
        absmax = state.absmax.reshape(-1).float()
        nested_absmax = nested_code = offset = absmax  # unused placeholders
        nested_blocksize = 1
    # the GPU's own float->bf16 store rounds to nearest even; only the interpreter needs it by hand
    by_hand = dtype == torch.bfloat16 and interpreting()
    n_blocks = triton.cdiv(n, state.blocksize)

    def launch(setting):
        elements, num_warps = setting
        rows = max(1, elements // state.blocksize)
        _dequant_4bit_kernel[(triton.cdiv(n_blocks, rows),)](
            data, absmax, code, dest.view(torch.int16) if by_hand else dest, n, n_blocks,
            nested_absmax, nested_code, offset,
            BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=nested_blocksize, NESTED=state.nested,
            ROUND_TO_BF16=by_hand, ROWS=rows, num_warps=num_warps, enable_fp_fusion=False,
        )

    key = ("nf4", row_bucket(n), state.blocksize, state.nested, dtype, packed.device)
    launch(measured_choice(key, _LAUNCH_SETTINGS, launch, packed.device))
    return dest
