"""OCP MX v1.0 formats: element encodings from the spec's tables, E8M0 scales, conversion rules,
and MX as a DSQ format (schedule parsing, ordering, a GEMM)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from dsq_fairseq.precision import FORMATS, DSQConfigError, Precision, QuantScheme, parse_schedule
from dsq_fairseq.quant import MX, MX_FORMATS, mx_decode, mx_encode, mx_quantize
from dsq_fairseq.quant.mx import e8m0_decode, e8m0_encode

NAN, INF = float("nan"), float("inf")


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def block(values, fill=0.0):
    """One full 32-element block: ``values`` then ``fill``."""
    return t(list(values) + [fill] * (32 - len(values)))


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------ element encodings (tables)


def test_every_mxfp4_code_from_the_spec_table():
    # FP4 E2M1: S EE M, bias 1; E=0 subnormal 0.5*M
    positive = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert MX("mxfp4").code_values().tolist() == positive + [-v for v in positive]
    assert MX("mxfp4").decode(t([0b1111])).item() == -6.0
    # every representable value (and its negative) survives conversion unchanged (scale 1)
    for v in positive[1:]:
        x = block([6.0, v, -v])
        assert_same(mx_quantize(x, "mxfp4"), x)
    codes, scales = mx_encode(block(positive + [-v for v in positive]), "mxfp4")
    assert codes.flatten()[:16].tolist() == list(range(16))[:8] + [8 | c for c in range(8)]
    assert scales.tolist() == [127]  # X = 2^(floor(log2 6) - 2) = 2^0


@pytest.mark.parametrize(
    "fmt, code, value",
    [
        ("mxfp8_e4m3", 0x7E, 448.0),  # S.1111.110 max normal
        ("mxfp8_e4m3", 0x7F, NAN),  # S.1111.111 NaN (no inf)
        ("mxfp8_e4m3", 0xFF, NAN),
        ("mxfp8_e4m3", 0x78, 256.0),  # S.1111.000 is a normal number in E4M3
        ("mxfp8_e4m3", 0x08, 2.0**-6),  # min normal
        ("mxfp8_e4m3", 0x01, 2.0**-9),  # min subnormal
        ("mxfp8_e4m3", 0xBC, -1.5),
        ("mxfp8_e5m2", 0x7B, 57344.0),  # S.11110.11 max normal
        ("mxfp8_e5m2", 0x7C, INF),  # S.11111.00
        ("mxfp8_e5m2", 0xFC, -INF),
        ("mxfp8_e5m2", 0x7D, NAN),
        ("mxfp8_e5m2", 0x7F, NAN),
        ("mxfp8_e5m2", 0x04, 2.0**-14),
        ("mxfp8_e5m2", 0x01, 2.0**-16),
        ("mxfp6_e3m2", 0x1F, 28.0),  # S.111.11
        ("mxfp6_e3m2", 0x04, 0.25),  # min normal 2^-2
        ("mxfp6_e3m2", 0x01, 0.0625),  # min subnormal 2^-4
        ("mxfp6_e2m3", 0x1F, 7.5),  # S.11.111
        ("mxfp6_e2m3", 0x08, 1.0),  # min normal 2^0
        ("mxfp6_e2m3", 0x01, 0.125),  # min subnormal 2^-3
        ("mxfp6_e2m3", 0x3F, -7.5),
        ("mxint8", 0x7F, 127 / 64),  # 1 63/64
        ("mxint8", 0x01, 1 / 64),
        ("mxint8", 0x80, -2.0),  # two's complement -128 / 64
        ("mxint8", 0xFF, -1 / 64),
    ],
)
def test_element_codes_from_the_spec_tables(fmt, code, value):
    got = MX(fmt).decode(t([code], torch.int32)).item()
    assert (math.isnan(got) and math.isnan(value)) or got == value


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_encode_decode_round_trip_over_every_code(fmt):
    mx = MX(fmt)
    values = mx.code_values()
    codes = torch.arange(2**mx.element_bits)
    keep = ~torch.isnan(values)
    assert torch.equal(mx.encode(values[keep]).to(torch.int64), codes[keep])
    assert mx.bits_per_element == mx.element_bits + 0.25


def test_e8m0_scale_codes():
    assert e8m0_encode(t([-127, 0, 127], torch.int32)).tolist() == [0, 127, 254]
    assert e8m0_decode(t([0, 127, 254, 255], torch.int32)).tolist()[:3] == [
        2.0**-127, 1.0, 2.0**127
    ]
    assert math.isnan(e8m0_decode(t([255], torch.int32)).item())
    with pytest.raises(ValueError):
        e8m0_encode(t([128], torch.int32))


# ------------------------------------------------------------------ conversion


def test_e4m3_and_e5m2_max_and_saturation():
    # amax 448 -> X = 2^(8-8) = 1: 448 exact, 464 (tie 448/480) -> 448, 500 -> 512 -> clamp 448
    assert mx_quantize(block([448.0, 464.0, 500.0, -500.0]), "mxfp8_e4m3")[:4].tolist() == [
        448.0, 448.0, 448.0, -448.0
    ]
    # E5M2: amax 57344 -> X = 2^(15-15) = 1
    q = mx_quantize(block([57344.0, 61439.0, 61440.0, 65535.0]), "mxfp8_e5m2")
    assert q[:4].tolist() == [57344.0] * 4  # 61440 rounds to 65536, saturates
    # the spec's scale can leave a block max above max normal: it saturates (E4M3: 480 -> 448)
    assert mx_quantize(block([480.0, 1.0]), "mxfp8_e4m3")[:2].tolist() == [448.0, 1.0]


def test_rounding_at_ties_is_to_even_mantissa():
    # MXFP4 at X = 1 (amax 6): grid 0 .5 1 1.5 2 3 4 6
    x = block([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, -5.0, 7.0])
    expect = block([6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -2.0, -4.0, 6.0])
    assert_same(mx_quantize(x, "mxfp4"), expect)
    # MXINT8 at X = 1 (amax in [1, 2)): grid k/64; 0.5/64 -> 0, 1.5/64 -> 2/64
    x = block([1.5, 0.5 / 64, 1.5 / 64, 2.5 / 64, -1.5 / 64, 1.999])
    assert_same(mx_quantize(x, "mxint8"), block([1.5, 0, 2 / 64, 2 / 64, -2 / 64, 127 / 64]))
    # E4M3 normal tie: 1 + 1/16 between 1 and 1.125 -> 1; 1 + 3/16 -> 1.25
    q = mx_quantize(block([256.0, 1 + 1 / 16, 1 + 3 / 16]), "mxfp8_e4m3")
    assert q[:3].tolist() == [256.0, 1.0, 1.25]


def test_scale_is_floor_log2_amax_minus_emax_and_tail_block():
    # amax 3.0 -> floor(log2) = 1; FP4 emax 2 -> X = 2^-1: 3.0 -> P = 6, 0.3 -> 0.6 -> 0.5 -> 0.25
    x = torch.zeros(40)
    x[0], x[1] = 3.0, 0.3
    x[32], x[33] = 0.01, 0.004  # tail block of 8: amax 0.01 -> X = 2^(-7-2)
    q = mx_quantize(x, "mxfp4")
    assert q[0].item() == 3.0 and q[1].item() == 0.25
    assert q[32:34].tolist() == [6 * 2.0**-9, 2 * 2.0**-9]  # 5.12 -> 6, 2.048 -> 2
    codes, scales = mx_encode(x, "mxfp4")
    assert codes.shape == (2, 32) and scales.tolist() == [126, 127 - 9]
    assert_same(mx_decode(codes, scales, "mxfp4").flatten()[:40], q)


def ref_element(y: Fraction, mx: MX) -> Fraction:
    """Nearest (ties to even code) representable element value, saturating; exact rationals."""
    grid = sorted(
        {Fraction(v) for v in mx.code_values().tolist() if math.isfinite(v)}
    )
    y = min(max(y, grid[0]), grid[-1])
    best = min(grid, key=lambda g: abs(g - y))
    ties = [g for g in grid if abs(g - y) == abs(best - y)]
    if len(ties) > 1:  # tie: the even code
        best = next(g for g in ties if int(mx.encode(t([float(g)]))) % 2 == 0)
    return best


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_random_blocks_match_an_exact_reference(fmt):
    mx = MX(fmt)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, generator=g) * torch.logspace(-3, 3, 32).pow(0.5)
    q = mx_quantize(x, fmt)
    for row in range(2):
        vals = x[row].tolist()
        e = math.frexp(max(abs(v) for v in vals))[1] - 1 - mx.emax
        scale = Fraction(2) ** e
        expect = [float(ref_element(Fraction(v) / scale, mx) * scale) for v in vals]
        assert q[row].tolist() == expect


def test_nan_and_inf_rules():
    x = block([1.0, NAN, 2.0, 0.5])
    # E4M3 / E5M2: NaN stays in its element, the others are quantized normally
    for fmt in ("mxfp8_e4m3", "mxfp8_e5m2"):
        q = mx_quantize(x, fmt)
        assert math.isnan(q[1].item()) and q[[0, 2, 3]].tolist() == [1.0, 2.0, 0.5]
        codes, scales = mx_encode(x, fmt)
        assert codes[0, 1].item() == 0x7F and scales.tolist() != [0xFF]  # S.1111.111 / S.11111.11
    # FP6/FP4/INT8 have no NaN code: the block scale is NaN, the whole block is NaN
    for fmt in ("mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8"):
        q = mx_quantize(torch.cat([x, block([1.0])]), fmt)
        assert torch.isnan(q[:32]).all() and q[32].item() == 1.0
        _, scales = mx_encode(x, fmt)
        assert scales.tolist() == [0xFF]
    # E5M2 keeps inf; the others saturate the scale and the element (as BFP does)
    q = mx_quantize(block([INF, -INF, 3.0]), "mxfp8_e5m2")
    assert q[:3].tolist() == [INF, -INF, 3.0]
    codes, _ = mx_encode(block([INF, -INF, 3.0]), "mxfp8_e5m2")
    assert codes[0, :2].tolist() == [0x7C, 0xFC]  # S.11111.00
    q = mx_quantize(block([INF, 3.0]), "mxfp4")
    assert q[0].item() == 6.0 * 2.0**125 and q[1].item() == 0.0


def test_dtypes_dims_subnormals_and_stochastic():
    x = torch.randn(3, 64, 5)
    q = mx_quantize(x, "mxfp8_e4m3", dim=1)
    moved = mx_quantize(x.transpose(1, 2), "mxfp8_e4m3", dim=-1).transpose(1, 2)
    assert_same(q, moved.contiguous())
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert mx_quantize(x.to(dtype), "mxfp4").dtype == dtype
    # fp32 subnormal inputs: the E8M0 scale bottoms out at 2^-127
    tiny = block([2.0**-130, 2.0**-131])
    assert mx_quantize(tiny, "mxfp8_e4m3")[:2].tolist() == [2.0**-130, 2.0**-131]
    # stochastic: reproducible from the generator, unbiased on average
    y = torch.full((32 * 256,), 1.25)
    y[::32] = 6.0
    a = mx_quantize(y, "mxfp4", rounding="stochastic", generator=torch.Generator().manual_seed(1))
    b = mx_quantize(y, "mxfp4", rounding="stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    mid = a.view(-1, 32)[:, 1:]
    assert set(mid.unique().tolist()) == {1.0, 1.5} and abs(mid.mean().item() - 1.25) < 0.02


def test_bad_arguments():
    with pytest.raises(ValueError, match="fmt must be one of"):
        mx_quantize(torch.ones(3), "mxfp5")
    with pytest.raises(ValueError, match="rounding"):
        mx_quantize(torch.ones(3), "mxfp4", rounding="up")
    assert MX("MXFP4_E2M1").fmt == "mxfp4" and str(MX("mxfp8_e5m2")) == "MXFP8_E5M2"


# ------------------------------------------------------------------ MX as a DSQ format


def test_schedule_with_mx_levels():
    text = "mxfp4,mxfp4,mxfp4,mxfp8_e5m2;mxfp8_e4m3,mxfp4,mxfp4,mxfp8_e5m2"
    levels = parse_schedule(text, format="mx")
    assert levels[0] == Precision("mxfp4", "mxfp4", "mxfp4", "mxfp8_e5m2")
    assert levels[1].bits == [8, 4, 4, 8] and str(levels[1]) == text.split(";")[1]
    assert parse_schedule("mxfp6_e2m3,mxfp4,mxfp4,fp32", format="mx")[0].bits == [6, 4, 4, 32]
    # E4M3 <-> E5M2 and MXINT8 have the same element bits: allowed both ways
    parse_schedule("mxfp8_e5m2,mxfp4,mxfp4,fp32;mxint8,mxfp4,mxfp4,fp32", format="mx")
    # the integer API is unchanged
    assert parse_schedule("2,2,2,16;16,4,4,16")[1] == Precision(16, 4, 4, 16)


@pytest.mark.parametrize(
    "text, fmt, message",
    [
        ("mxfp8_e4m3,mxfp4,mxfp4,fp32;mxfp4,mxfp4,mxfp4,fp32", "mx", "goes below"),
        ("mxfp4,mxfp4,mxfp4,16", "mx", "not an MX format.*mxint8, mxfp8_e4m3"),
        ("mxfp4,mxfp4,mxfp4,mxfp3", "mx", "mxint8, mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2"),
        ("mxfp4,4,4,16", "bfp", "needs --dsq-format mx"),
        ("mxfp4,mxfp4,mxfp4", "mx", "exactly 4"),
    ],
)
def test_bad_mx_schedules_name_the_flag_and_the_allowed_names(text, fmt, message):
    with pytest.raises(DSQConfigError, match="--dsq-schedule") as info:
        parse_schedule(text, format=fmt)
    assert info.match(message)


def test_quant_scheme_mx_quantizes_by_point_name():
    scheme = QuantScheme(format="mx")
    x = torch.randn(4, 64)
    assert_same(scheme.quantize(x, "mxfp4", dim=-1), mx_quantize(x, "mxfp4"))
    assert scheme.quantize(x, 32) is x
    with pytest.raises(DSQConfigError, match="--dsq-schedule"):
        scheme.quantize(x, 8)
    assert "mx" in FORMATS


def test_dsq_gemm_runs_on_mx_operands():
    from dsq_fairseq.nn.functional import dsq_linear
    from dsq_fairseq.nn.runtime import DSQRuntime

    scheme = QuantScheme(format="mx")
    p = Precision("mxfp8_e4m3", "mxfp4", "mxfp8_e4m3", "mxfp8_e5m2")
    runtime = DSQRuntime(scheme, p)
    assert runtime.active
    x = torch.randn(5, 64, requires_grad=True)
    w = torch.randn(16, 64, requires_grad=True)
    y = dsq_linear(x, w, None, runtime)
    expect = mx_quantize(x.detach(), "mxfp8_e4m3") @ mx_quantize(w.detach(), "mxfp8_e4m3").t()
    torch.testing.assert_close(y.detach(), expect)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
    assert not DSQRuntime(scheme, Precision(32, 32, 32, 32)).active


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_cuda_matches_cpu(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 100, generator=g) * torch.logspace(-30, 30, 100)
    x[0, :5] = t([NAN, INF, -INF, 0.0, 2.0**-140])
    x[1] = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for dim in (0, -1):
            cpu = mx_quantize(x.to(dtype), fmt, dim=dim)
            gpu = mx_quantize(x.to(dtype).cuda(), fmt, dim=dim)
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0, equal_nan=True)
