"""4-bit dequantization vs bitsandbytes' own, bit for bit.

CPU: the torch reference and the Triton kernel (interpreter) against bitsandbytes' CPU
dequantization. Two known differences of bitsandbytes' CPU path from its CUDA kernel (which
is what we match) are accounted for:
  * FP4 code 8 decodes to +0.0 on CPU, -0.0 on CUDA: compared modulo the sign of zero, and
    the -0.0 checked explicitly.
  * its C++ kernel puts block boundaries at row ends when a row is not a multiple of the
    blocksize (quantize_4bit does not): such shapes are compared against bitsandbytes'
    pure-torch implementation instead.
GPU: raw bits against bitsandbytes' CUDA dequantization, signed zeros included.
"""
import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from unittest import mock  # noqa: E402

from sloth_plugins.kernels import nf4  # noqa: E402
from sloth_plugins.kernels.nf4 import QuantState4bit, dequant_buffer, dequantize_4bit, dequantize_4bit_reference  # noqa: E402


def dequantize_4bit_triton(packed, state, dtype, **kwargs):
    """dequantize_4bit down its Triton path, as on CUDA (here: the interpreter)."""
    with mock.patch.object(nf4, "use_triton", lambda *tensors: True):
        return dequantize_4bit(packed, state, dtype, **kwargs)

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]



def _bits(t):
    return t.contiguous().view(BITS[t.dtype])


def _weight(shape, dtype, device="cpu"):
    w = torch.randn(shape, device=device).to(dtype)
    flat = w.view(-1)
    flat[3:40:3] = -1e-7  # tiny negatives: FP4 code 8 (negative zero)
    return w


def _quantize(w, quant_type, nested, blocksize=64):
    packed, qs = bnb_functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested,
                                              quant_type=quant_type)
    return packed, qs, QuantState4bit.from_bnb(qs)


def _nibbles(packed, n):
    b = packed.reshape(-1)
    return torch.stack((b >> 4, b & 15), 1).reshape(-1)[:n]


def _assert_matches_bnb_cpu(ours, theirs, packed, quant_type):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert not torch.isnan(ours).any()
    same_bits = _bits(ours) == _bits(theirs)
    if quant_type == "nf4":
        assert same_bits.all()
        return
    code8 = (_nibbles(packed, ours.numel()) == 8).view(ours.shape)
    assert code8.any(), "test weight should exercise FP4 code 8"
    assert (same_bits | code8).all()
    assert torch.equal(ours, theirs)  # -0.0 == +0.0
    zeros = ours[code8]
    assert (zeros == 0).all() and torch.signbit(zeros).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_bitsandbytes_cpu(quant_type, nested, dtype):
    w = _weight((128, 256), dtype)  # 512 absmax blocks: two nested blocks of 256
    packed, qs, state = _quantize(w, quant_type, nested)
    assert state.nested == nested
    theirs = bnb_functional.dequantize_4bit(packed, qs)
    _assert_matches_bnb_cpu(dequantize_4bit_reference(packed, state), theirs, packed, quant_type)
    _assert_matches_bnb_cpu(dequantize_4bit_triton(packed, state, dtype), theirs, packed, quant_type)
    _assert_matches_bnb_cpu(dequantize_4bit(packed, state), theirs, packed, quant_type)


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes(blocksize):
    w = _weight((64, 256), torch.float32)
    packed, qs, state = _quantize(w, "nf4", True, blocksize)
    theirs = bnb_functional.dequantize_4bit(packed, qs)
    _assert_matches_bnb_cpu(dequantize_4bit_triton(packed, state, torch.float32), theirs, packed, "nf4")
    _assert_matches_bnb_cpu(dequantize_4bit_reference(packed, state), theirs, packed, "nf4")


@pytest.mark.parametrize("shape", [(48, 40), (7, 9), (3, 5)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_unaligned_and_odd_shapes_match_bnb_torch_path(shape, quant_type):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.functional import get_4bit_type
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile
    for nested in (False, True):
        w = _weight(shape, torch.float16)
        packed, qs, state = _quantize(w, quant_type, nested)
        absmax = bnb_functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if nested else qs.absmax
        theirs = compute(packed.reshape(-1), absmax, get_4bit_type(quant_type, "cpu"), 64, qs.shape, torch.float16)
        assert theirs.shape == w.shape
        for ours in (dequantize_4bit_reference(packed, state), dequantize_4bit_triton(packed, state, torch.float16)):
            assert torch.equal(ours, theirs) and not torch.isnan(ours).any()
            assert (ours - w).abs().max() <= w.abs().max() * 0.3  # it really is the weight


def test_upcast_only_at_store():
    """Any output dtype is code·absmax in fp32, rounded once: bf16 output of an fp32-quantized weight
    equals the fp32 dequantization cast to bf16 (round to nearest even, also under the interpreter)."""
    w = _weight((64, 128), torch.float32)
    packed, _, state = _quantize(w, "nf4", True)
    full = dequantize_4bit_reference(packed, state, torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        want = full.to(dtype)
        assert torch.equal(_bits(dequantize_4bit_reference(packed, state, dtype)), _bits(want))
        assert torch.equal(_bits(dequantize_4bit_triton(packed, state, dtype)), _bits(want))


def test_out_and_reuse_buffer():
    w = _weight((32, 128), torch.float16)
    packed, qs, state = _quantize(w, "nf4", False)
    want = bnb_functional.dequantize_4bit(packed, qs)
    for fn in (dequantize_4bit_reference, lambda p, s, **kw: dequantize_4bit_triton(p, s, torch.float16, **kw)):
        out = torch.full((w.numel(),), float("nan"), dtype=torch.float16)
        got = fn(packed, state, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, want)
        first = fn(packed, state, reuse_buffer=True)
        second = fn(packed, state, reuse_buffer=True)
        assert first.data_ptr() == second.data_ptr() == dequant_buffer(w.device, torch.float16, w.numel()).data_ptr()
        assert torch.equal(second, want) and second.shape == w.shape
    with pytest.raises(ValueError):
        dequantize_4bit_reference(packed, state, out=torch.empty(5, dtype=torch.float16))


def test_quant_storage_other_than_uint8():
    w = _weight((16, 128), torch.bfloat16)
    packed, qs = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    state = QuantState4bit.from_bnb(qs)
    want = bnb_functional.dequantize_4bit(packed, qs)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(_bits(dequantize_4bit_triton(packed, state, torch.bfloat16)), _bits(want))
    assert torch.equal(_bits(dequantize_4bit_reference(packed, state)), _bits(want))


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (1024, 4096), (7, 9)])
def test_bit_exact_vs_bitsandbytes_cuda(quant_type, nested, dtype, shape):
    w = _weight(shape, dtype, "cuda")
    packed, qs, state = _quantize(w, quant_type, nested)
    want = bnb_functional.dequantize_4bit(packed, qs)
    got = dequantize_4bit(packed, state)
    assert got.is_cuda and got.dtype == dtype and got.shape == want.shape
    assert torch.equal(_bits(got), _bits(want))
    got_buf = dequantize_4bit(packed, state, reuse_buffer=True)
    assert torch.equal(_bits(got_buf), _bits(want))
    # the torch reference agrees on the GPU too
    assert torch.equal(_bits(dequantize_4bit_reference(packed, state)), _bits(want))


def test_from_bnb_is_reused_until_the_scales_change():
    """One wrapper per bitsandbytes state while its scale tensors are the same objects (a step
    asks for every weight's state several times); a moved or replaced state gets a new one, and
    a state that is garbage-collected leaves nothing behind."""
    import gc

    import sloth_plugins.kernels.nf4 as nf4
    w = _weight((64, 32), torch.float32)
    packed, qs, state = _quantize(w, "nf4", True)
    assert QuantState4bit.from_bnb(qs) is state
    assert state.triton_args is state.triton_args           # kernel arguments prepared once
    qs.absmax = qs.absmax.clone()                            # e.g. QuantState.to(device) replaces it
    fresh = QuantState4bit.from_bnb(qs)
    assert fresh is not state and fresh.absmax is qs.absmax
    qs.state2.absmax = qs.state2.absmax.clone()
    assert QuantState4bit.from_bnb(qs) is not fresh
    torch.testing.assert_close(dequantize_4bit_reference(packed, QuantState4bit.from_bnb(qs)),
                               dequantize_4bit_reference(packed, state))
    key = id(qs)
    del qs
    gc.collect()
    assert key not in nf4._from_bnb_cache
