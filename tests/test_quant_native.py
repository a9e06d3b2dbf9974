"""The native CPU kernels (:mod:`dsq_fairseq.quant.native`) against the eager references, bit for
bit: every layout branch of the C code (16 contiguous blocks at a time, single contiguous blocks
with short tails and other block sizes, blocks along an outer dim with a partial vector of lanes),
serial and OpenMP-parallel sizes, every width class, narrow exponent fields (clamped E), NaN
payloads, +-inf, subnormals, -0 and all-zero blocks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_quant_fast import assert_bits, nasty

from dsq_fairseq import quant as ref
from dsq_fairseq.precision import QuantScheme
from dsq_fairseq.quant import fast, fast_pack, native
from dsq_fairseq.quant.bfp import shared_exponent
from dsq_fairseq.quant.packing import PackedTensor, _blocked_view, pack
from dsq_fairseq.quant.rounding import uniform_like

pytestmark = pytest.mark.skipif(
    not native.available(torch.ones(1)),
    reason="native CPU kernels need AVX-512 or AVX2 and a C compiler",
)

# (shape, dim, block): rows of 16 (whole tiles of 16 blocks, plus a partial tile), rows with a
# short tail block and other block sizes (one vector per block, masked; blocks longer than 16),
# blocks along an outer dim with Q not a multiple of 16 and a tail block, 0-d and 1-d tensors,
# and sizes above the kernels' 32768-element threshold (OpenMP-parallel loops)
LAYOUTS = [((40, 64), -1, 16), ((7, 48), -1, 16), ((9, 37), -1, 16), ((6, 40), -1, 8),
           ((5, 70), -1, 32), ((4, 12), -1, 5), ((37, 6), 0, 16), ((3, 20, 21), 1, 16),
           ((45, 32), 0, 16), ((2, 9, 40), 1, 4), ((5,), 0, 16), ((), 0, 16),
           ((256, 256), -1, 16), ((300, 130), -1, 16), ((257, 160), 0, 16), ((130, 300), 0, 7)]


def _native_only(monkeypatch):
    """Fail instead of silently falling back to the compiled or reference path."""
    monkeypatch.setattr(fast, "_call", lambda *a: pytest.fail(f"compiled path used: {a[0]}"))


@pytest.mark.parametrize("width", [2, 3, 4, 8, 16, 31])
def test_quantize_bit_identical(width, monkeypatch):
    _native_only(monkeypatch)
    for i, (shape, dim, block) in enumerate(LAYOUTS):
        for e in ((8, 4, 2) if width == 4 else (8,)):
            x = nasty(shape, seed=i)
            got = fast.bfp_quantize(x, width, e, block, dim)
            assert_bits(got, ref.bfp_quantize(x, width, e, block, dim))


@pytest.mark.parametrize("width", [2, 4, 16])
def test_stochastic_quantize_bit_identical(width, monkeypatch):
    """Stochastic rounding in the kernel: the same key (one draw from the same seeded generator)
    and the same ``u`` per element (computed in registers from its flat index) as the reference,
    on every layout branch; NaN, inf, -0 and subnormals included (``nasty``)."""
    _native_only(monkeypatch)
    calls = []
    real = native.bfp_quantize
    monkeypatch.setattr(native, "bfp_quantize",
                        lambda *a, **k: calls.append(k.get("key") is not None) or real(*a, **k))
    for i, (shape, dim, block) in enumerate(LAYOUTS):
        x = nasty(shape, seed=i)
        if x.numel() > 1:
            x.view(-1)[-1] = -0.0  # the reference's floor(y) + 0.0 makes it +0
        got = fast.bfp_quantize(x, width, 8, block, dim, "stochastic",
                                torch.Generator().manual_seed(i))
        want = ref.bfp_quantize(x, width, 8, block, dim, "stochastic",
                                torch.Generator().manual_seed(i))
        assert_bits(got, want)
    assert calls == [True] * len(LAYOUTS)


def test_uniform_stream_kernel_matches_the_definition():
    """``native.uniform`` == ``rounding.uniform_like`` bit for bit: lengths around the vector
    width and above the threshold of the parallel loop."""
    key = torch.tensor([0x9E3779B9, 0xDEADBEEF])
    for n in (1, 15, 16, 17, 40000, 65539):
        assert torch.equal(native.uniform(key, (n,)), uniform_like(key, (n,)))


@pytest.mark.parametrize("width", [2, 4, 16])
def test_quantize_in_place_bit_identical(width, monkeypatch):
    """``fast.bfp_quantize_`` writes the same bits over its input (every layout branch reads a
    whole block before writing it) and returns that very tensor; where the kernel can't take
    the input (not contiguous, needs a gradient) it returns a new tensor, same values."""
    _native_only(monkeypatch)
    for i, (shape, dim, block) in enumerate(LAYOUTS):
        x = nasty(shape, seed=i)
        want = ref.bfp_quantize(x, width, 8, block, dim)
        y = x.clone()
        got = fast.bfp_quantize_(y, width, 8, block, dim)
        assert got.data_ptr() == y.data_ptr()
        assert_bits(got, want)
        assert_bits(y, want)
    x = nasty((64, 48), seed=1)
    xt = x.t()  # not contiguous: left alone
    got = fast.bfp_quantize_(xt, 4, dim=0)
    assert_bits(got, ref.bfp_quantize(xt, 4, dim=0))
    assert_bits(x, nasty((64, 48), seed=1))
    leaf = x.clone().requires_grad_(True)
    got = fast.bfp_quantize_(leaf, 4)
    assert got.data_ptr() != leaf.data_ptr()
    assert_bits(leaf.detach(), x)
    scheme = QuantScheme("bfp")
    y = x.clone()
    assert scheme.quantize(y, 4, dim=0, overwrite=True) is y
    assert_bits(y, ref.bfp_quantize(x, 4, dim=0))
    assert scheme.quantize(y, 32, overwrite=True) is y  # full precision: untouched


def test_nan_payloads_and_non_fp32_inputs():
    x = nasty((32, 32), seed=5)
    x.view(torch.int32)[3, 3] = 0x7FC00123  # a quiet NaN with a payload: kept, as the reference
    x.view(torch.int32)[20, 1] = -0x3FFFFF  # negative NaN
    for dim in (0, 1):
        assert_bits(fast.bfp_quantize(x, 4, dim=dim), ref.bfp_quantize(x, 4, dim=dim))
    for dtype in (torch.bfloat16, torch.float16):  # converted to fp32, the kernel, back
        xd = x.to(dtype)
        assert_bits(fast.bfp_quantize(xd, 4, dim=0), ref.bfp_quantize(xd, 4, dim=0))


def test_kernels_follow_torch_threads():
    x = nasty((512, 256), seed=9)
    want = ref.bfp_quantize(x, 4, dim=0)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert_bits(native.bfp_quantize(x, 4, 8, 16, 0), want)
    finally:
        torch.set_num_threads(threads)


# written straight into the stream (runs of codes on whole bytes) and, below the line, through
# one byte per code (rows of 7 / 15 codes, blocks of 5, a total not a multiple of 8 codes; an
# attention-probability-like [heads, tgt, src] along tgt, big enough for the parallel loops)
PACK_LAYOUTS = [((48, 32), 0, 16), ((45, 32), 0, 16), ((4, 24, 8), 1, 16), ((40, 64), 1, 16),
                ((7, 48), 1, 16), ((4, 8, 24), 2, 16), ((3, 40), 1, 8), ((33, 24), 0, 8),
                ((300, 512), 0, 16), ((520, 256), 1, 16), ((19, 8), 1, 16),
                ((16, 7), 0, 16), ((3, 15), 1, 16), ((3, 40), 1, 5), ((2, 11, 6), 1, 16),
                ((3, 3, 5), 0, 16), ((45, 33), 0, 16), ((96, 37, 41), 1, 16)]


@pytest.mark.parametrize("width", [2, 4, 8, 16])
def test_pack_same_bytes_as_the_reference_and_unpacks_to_the_quantizer_output(width):
    if width < 8:  # both the direct and the one-byte-per-code kernels are exercised
        assert {native._direct(torch.Size(s), width, d, b) for s, d, b in PACK_LAYOUTS} == {
            True, False}
    for i, (shape, dim, block) in enumerate(PACK_LAYOUTS):
        x = torch.nan_to_num(nasty(shape, seed=i), nan=1.5, posinf=2.0, neginf=-3.0)
        x.view(-1)[-1] = -0.0
        for e in ((8, 3) if width == 4 else (8,)):
            q = ref.bfp_quantize(x, width, e, block, dim)
            expected = pack(q, "bfp", width, dim=dim, block_size=block, exponent_bits=e)
            codes, exps = native.bfp_pack(x, width, e, block, dim)
            assert torch.equal(codes, expected.codes), (shape, dim, block)
            # exponents: the quantizer's E per block (packing.pack reads E back from the codes,
            # so it differs where a block's codes are all zero: E clamped from below)
            xb = _blocked_view(x, dim, block)[0]
            want_e = shared_exponent(xb.abs().amax(dim=2, keepdim=True), e).to(torch.int8)
            assert torch.equal(exps, want_e), (shape, dim, block)
            nonzero = expected.scales != 0
            assert torch.equal(exps[nonzero], expected.scales[nonzero])
            out = native.bfp_unpack(codes, exps, x.shape, width, block, dim)
            assert_bits(out, q)
            via_pack = fast_pack.bfp_pack(x, width, e, block, dim)  # the stash path takes it
            assert torch.equal(via_pack.codes, codes) and via_pack.fast
            assert_bits(via_pack.unpack(), q)
            reference = PackedTensor(*via_pack.tensors(), *via_pack.meta()[:5]).unpack()
            assert_bits(reference, q)


def test_pack_declines_non_finite_inputs_and_other_widths():
    for bad in (float("nan"), float("inf"), float("-inf")):
        for shape, dim in (((32, 16), 0), ((32, 16), 1), ((20, 48), 1)):
            x = torch.ones(shape)
            x[shape[0] - 1, 5] = bad  # in the last (partial) tile or tail block too
            assert native.bfp_pack(x, 4, 8, 16, dim) is None
    assert native.supports_pack(torch.Size((16, 7)), 4)
    assert native.supports_pack(torch.Size((16, 8)), 16)
    assert not native.supports_pack(torch.Size((16, 8)), 3)  # no packed layout: the reference
    assert not native.supports_pack(torch.Size(()), 4) and not native.supports_pack(
        torch.Size((0, 8)), 4)


def test_quant_scheme_takes_native_bfp_at_any_size_and_can_be_turned_off(monkeypatch):
    calls = []
    real = native.bfp_quantize
    monkeypatch.setattr(native, "bfp_quantize",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x = nasty((8, 40), seed=2)
    scheme = QuantScheme("bfp")
    assert_bits(scheme.quantize(x, 4, dim=0), ref.bfp_quantize(x, 4, dim=0))
    assert calls == [x.shape]  # far below fast.min_numel(), during the warm-up: still native
    stochastic = QuantScheme("bfp", rounding="stochastic")
    assert_bits(stochastic.quantize(x, 4, generator=torch.Generator().manual_seed(1)),
                ref.bfp_quantize(x, 4, rounding="stochastic",
                                 generator=torch.Generator().manual_seed(1)))
    assert calls == [x.shape] * 2  # stochastic rounding too: u computed in the kernel
    native.set_enabled(False)
    try:
        assert not native.available(x)
        scheme.quantize(x, 4, dim=0)
    finally:
        native.set_enabled(True)
    assert calls == [x.shape] * 2  # not when the native path is disabled
    fast.set_enabled(False)
    try:
        assert not native.available(x)  # DSQ_FAST=0 turns the native kernels off too
    finally:
        fast.set_enabled(True)


@pytest.mark.parametrize("packing", ["auto", "off"])
def test_dsq_gemms_take_the_pair_kernels_bit_identically(packing, monkeypatch):
    """Linear forward (Q0(x) + packed Q1(x)), linear backward (Q2(g) + Q3(g)), matmul forward
    (Q0(a) + Q1(a)) and backward (Q2(g) both ways) read their tensor once through
    :func:`native.bfp_pair`; values and gradients are those of the separate quantizations."""
    from dsq_fairseq.nn.functional import dsq_linear, dsq_matmul
    from dsq_fairseq.nn.runtime import DSQRuntime
    from dsq_fairseq.precision import Precision

    gen = torch.Generator().manual_seed(0)
    x = nasty((37, 3, 48), seed=4).nan_to_num(1.0, 2.0, -2.0)  # [T, B, K]
    w, bias = torch.randn(32, 48, generator=gen), torch.randn(32, generator=gen)
    a, b = torch.randn(6, 20, 32, generator=gen), torch.randn(6, 32, 48, generator=gen)
    gy, gc = torch.randn(37, 3, 32, generator=gen), torch.randn(6, 20, 48, generator=gen)

    def run():
        rt = DSQRuntime(QuantScheme("bfp"), Precision(16, 4, 4, 16), stash_packing=packing)
        leaves = [t.clone().requires_grad_(True) for t in (x, w, bias, a, b)]
        y = dsq_linear(leaves[0], leaves[1], leaves[2], rt)
        c = dsq_matmul(leaves[3], leaves[4], rt)
        torch.autograd.backward([y, c], [gy, gc])
        return [y.detach(), c.detach()] + [t.grad for t in leaves]

    calls = []
    real = native.bfp_pair
    monkeypatch.setattr(native, "bfp_pair", lambda *a, **k: calls.append(a[0].shape)
                        or real(*a, **k))
    with_pair = run()
    assert len(calls) == 4, calls
    native.set_enabled(False)
    try:
        without = run()
    finally:
        native.set_enabled(True)
    assert len(calls) == 4
    for got, want in zip(with_pair, without):
        assert_bits(got, want)


@pytest.mark.parametrize("widths", [(16, 4), (4, 16), (8, 2), (16, 16), (3, 8)])
def test_pair_kernel_matches_two_quantizations_and_the_packed_stream(widths):
    """:func:`native.bfp_pair`: along the last dim at one width and along the second-to-last at
    the other (fp32, or packed: the bytes of :func:`.packing.pack`, width 16's two byte streams
    included), tiles with a short tail along the outer dim, serial and parallel sizes."""
    w_last, w_outer = widths
    for i, shape in enumerate([(40, 32), (37, 48), (3, 21, 16), (300, 512)]):
        x = torch.nan_to_num(nasty(shape, seed=30 + i), nan=1.5, posinf=2.0, neginf=-3.0)
        x.view(-1)[-1] = -0.0
        q_last = ref.bfp_quantize(x, w_last, dim=-1)
        q_outer = ref.bfp_quantize(x, w_outer, dim=-2)
        got_last, got_outer = native.bfp_pair(x, w_last, w_outer, 8)
        assert_bits(got_last, q_last)
        assert_bits(got_outer, q_outer)
        if w_outer not in native.PACK_WIDTHS:
            continue
        got_last, (codes, exps) = native.bfp_pair(x, w_last, w_outer, 8, pack_outer=True)
        assert_bits(got_last, q_last)
        assert torch.equal(codes, pack(q_outer, "bfp", w_outer, dim=-2).codes), shape
        unpacked = PackedTensor(codes, exps, x.shape, w_outer, "pow2", x.dim() - 2, 16).unpack()
        assert_bits(unpacked, q_outer)


def _extreme_tiles() -> torch.Tensor:
    """[64, 64]: 16 x 16 tiles of ordinary values, of blocks far below the normal range (all
    subnormal: E clamped at -emax), near the top of the range, and tiles whose rows or columns
    mix those scales, so that every kernel meets tiles where the one-step scale factor
    ``2^k`` applies to all blocks and tiles where some block needs the two halves."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 64, generator=g)
    x[:16, 16:32] *= 2.0 ** -140  # subnormal blocks both ways
    x[16:32, :16] *= 2.0 ** 126  # |k| = 127 - (w - 2) for small w
    x[32:48, 32:48] *= 2.0 ** -120
    x[33, 32:48] *= 2.0 ** -25  # one tiny row block in an otherwise ordinary tile
    x[48:64, 50] *= 2.0 ** -150  # one tiny column (underflows to zeros and subnormals)
    x[40, 0] = 2.0 ** -149
    return x


@pytest.mark.parametrize("width", [2, 4, 8, 16, 31])
def test_one_step_and_two_step_scaling_tiles_are_bit_identical(width):
    """Tiles where every block takes the one-step factor and tiles that fall back to the
    reference's two halves (|k| > 126), through every round-to-nearest kernel."""
    x = _extreme_tiles()
    for dim in (0, 1):
        q = ref.bfp_quantize(x, width, 8, 16, dim)
        assert_bits(native.bfp_quantize(x, width, 8, 16, dim), q)
        y = x.clone()
        assert_bits(native.bfp_quantize(y, width, 8, 16, dim, inplace=True), q)
        if width in native.PACK_WIDTHS:
            codes, exps = native.bfp_pack(x, width, 8, 16, dim)
            assert torch.equal(codes, pack(q, "bfp", width, dim=dim).codes)
            assert_bits(native.bfp_unpack(codes, exps, x.shape, width, 16, dim), q)
    for w_outer in (width, 4):
        q_last, q_outer = native.bfp_pair(x, width, w_outer, 8)
        assert_bits(q_last, ref.bfp_quantize(x, width, 8, 16, 1))
        assert_bits(q_outer, ref.bfp_quantize(x, w_outer, 8, 16, 0))
        if w_outer in native.PACK_WIDTHS:
            _, (codes, _) = native.bfp_pair(x, width, w_outer, 8, pack_outer=True)
            assert torch.equal(codes, pack(ref.bfp_quantize(x, w_outer, 8, 16, 0), "bfp",
                                           w_outer, dim=0).codes)


def test_built_for_one_of_the_two_instruction_sets(monkeypatch):
    assert native.isa() in ("avx512", "avx2")
    monkeypatch.setenv("DSQ_NATIVE_ISA", "avx2")
    assert native._flags()[-1] == "-mno-avx512f"  # another build, another cache entry
    monkeypatch.delenv("DSQ_NATIVE_ISA")
    assert "-mno-avx512f" not in native._flags() and "-ffp-contract=off" in native._flags()


@pytest.mark.skipif(native.isa() != "avx512",
                    reason="this CPU builds the AVX2 kernels already: the tests above ran them")
def test_avx2_kernels_on_an_avx512_cpu(tmp_path):
    """Every test of this file again with the AVX2 layer of native_simd.h (DSQ_NATIVE_ISA=avx2),
    so an AVX-512 machine checks both instruction sets bit for bit."""
    env = dict(os.environ, DSQ_NATIVE_ISA="avx2", DSQ_NATIVE_CACHE=str(tmp_path))
    here = Path(__file__)
    probe = subprocess.run(
        [sys.executable, "-c", "from dsq_fairseq.quant import native; print(native.isa())"],
        env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "avx2"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here),
         "-k", "not avx2_kernels_on"], env=env, cwd=str(here.parent.parent),
        capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
