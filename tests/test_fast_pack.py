"""The fused quantize-and-pack (:mod:`dsq_fairseq.quant.fast_pack`) against the references:
the same bytes as ``pack(bfp_quantize(x))`` and, unpacked, the quantizer's output bit for bit."""

from __future__ import annotations

import pytest
import torch
from test_quant_fast import nasty

from dsq_fairseq.quant import bfp_quantize, fast, fast_pack, native
from dsq_fairseq.quant.packing import PackedTensor, pack


@pytest.fixture(autouse=True, params=["native", "compiled"])
def _fast_on(request, monkeypatch):
    """Every test with the native CPU kernels (:mod:`.native`, where available) and with the
    compiled kernels alone."""
    was = fast.enabled()
    fast.set_enabled(True)
    monkeypatch.setattr(native, "_enabled", request.param == "native")
    if request.param == "native" and not native.available(torch.ones(1)):
        pytest.skip("native CPU kernels not available here (no AVX-512/AVX2 or no C compiler)")
    monkeypatch.setattr(fast_pack, "UNPACK_MIN_NUMEL", 0)  # the compiled unpack at any size
    yield
    fast.set_enabled(was)


def finite(shape, seed=0):
    """:func:`nasty` values (scales 2^-30..2^30, ties, subnormals, zero blocks) without NaN/inf,
    plus a ``-0``."""
    x = torch.nan_to_num(nasty(shape, seed=seed), nan=1.5, posinf=2.0, neginf=-3.0)
    x.view(-1)[-1] = -0.0
    return x


# (shape, dim): blocks along the contiguous last dim (axis 1) and along an outer dim (axis 2),
# with and without a short tail block (also shorter than one block); the stash shapes of a
# linear ([tokens, K] along tokens) and of both attention matmul operands; rows that don't split
# into whole bytes (the stream runs on across rows) and a total not a multiple of 8 codes
CASES = [((48, 32), 0), ((45, 32), 0), ((4, 24, 8), -2), ((4, 8, 32), -1), ((4, 8, 24), -1),
         ((3, 5, 16), 1), ((16, 7), 0), ((3, 15), -1), ((6, 10), -1), ((2, 11, 6), 1),
         ((3, 3, 5), 0)]


# widths 2 and 8 (other join/split shifts, no join at 8) on one case per layout: each extra shape
# can cost a recompile, and every width is its own set of compiles
LAYOUT_CASES = [((48, 32), 0), ((4, 8, 32), -1), ((3, 15), -1)]


@pytest.mark.parametrize("width", [2, 4, 8])
def test_same_bytes_as_the_reference_and_unpacks_to_the_quantizer_output(width):
    for i, (shape, dim) in enumerate(CASES if width == 4 else LAYOUT_CASES):
        x = finite(shape, seed=i)
        q = bfp_quantize(x, width, 8, 16, dim)
        expected = pack(q, "bfp", width, dim=dim, block_size=16)
        packed = fast_pack.bfp_pack(x, width, 8, 16, dim)
        assert packed is not None and packed.fast, (shape, dim)
        assert torch.equal(packed.codes, expected.codes), (shape, dim)
        assert torch.equal(packed.scales, expected.scales), (shape, dim)
        assert packed.meta()[:5] == expected.meta()[:5]
        unpacked = packed.unpack()
        assert fast_pack.bfp_unpack(packed) is not None  # the compiled kernels, tails included
        assert torch.equal(unpacked.view(torch.int32), q.view(torch.int32)), (shape, dim)
        reference = PackedTensor(*packed.tensors(), *packed.meta()[:5]).unpack()
        assert torch.equal(reference.view(torch.int32), q.view(torch.int32))


def test_smaller_exponent_fields_and_block_sizes():
    x = finite((32, 24), seed=7)
    for exponent_bits, block in ((4, 16), (8, 8), (3, 4)):
        q = bfp_quantize(x, 4, exponent_bits, block, 0)
        packed = fast_pack.bfp_pack(x, 4, exponent_bits, block, 0)
        expected = pack(q, "bfp", 4, dim=0, block_size=block, exponent_bits=exponent_bits)
        assert torch.equal(packed.codes, expected.codes)
        assert torch.equal(packed.unpack().view(torch.int32), q.view(torch.int32))


def test_non_finite_input_is_not_packed():
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = finite((32, 16))
        x[3, 5] = bad
        assert fast_pack.bfp_pack(x, 4, 8, 16, 0) is None


def test_other_widths_dtypes_and_empty_tensors_are_declined():
    assert fast_pack.supports(torch.zeros(16, 7), 4, 0, 16)  # any shape
    assert not fast_pack.supports(torch.zeros(16, 8), 16, 0, 16)  # not compiled at width 16
    assert not fast_pack.supports(torch.zeros(16, 8, dtype=torch.float16), 4, 0, 16)
    assert not fast_pack.supports(torch.zeros(0, 8), 4, 0, 16)
    assert not fast_pack.supports(torch.zeros(()), 4, 0, 16)
    # width 16: the native kernels only (the compiled ones decline, the reference packs it)
    packed = fast_pack.bfp_pack(torch.zeros(16, 8), 16, 8, 16, 0)
    assert (packed is not None) == native.available(torch.ones(1))
    assert fast_pack.bfp_pack(torch.zeros(16, 8), 3, 8, 16, 0) is None
    fast.set_enabled(False)
    assert not fast_pack.supports(torch.zeros(16, 8), 4, 0, 16)
