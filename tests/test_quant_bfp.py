"""BFP(w, e, B) against DESIGN.md section 1: hand-computed blocks and an exact reference.

Expected values are written out by hand (comments give E and s); the random tests
compare with a slow per-element reference in exact rational arithmetic
(``fractions.Fraction``), written straight from the definition.
"""

from __future__ import annotations

import dataclasses
import math
import random
from fractions import Fraction

import pytest
import torch

from dsq_fairseq.quant import BFP, bfp_quantize

NAN = float("nan")
INF = float("inf")


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise-equal values (NaN == NaN), same shape and dtype."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- reference


def ref_block(values: list[float], w: int, e: int) -> list[float]:
    """One block, straight from the definition, exact rational arithmetic."""
    emax = 2 ** (e - 1) - 1
    qmax = 2 ** (w - 1) - 1
    finite = [abs(x) for x in values if not math.isnan(x)]
    if any(math.isinf(x) for x in finite):
        big = emax
    else:
        m = max(finite, default=0.0)
        big = 0 if m == 0 else math.frexp(m)[1] - 1  # floor(log2 m), exact
    big = min(max(big, -emax), emax)
    s = Fraction(2) ** (big - (w - 2))
    out = []
    for x in values:
        if math.isnan(x):
            out.append(NAN)
            continue
        if math.isinf(x):
            k = qmax if x > 0 else -qmax
        else:
            k = round(Fraction(x) / s)  # Python rounds Fractions half to even
            k = min(max(k, -qmax), qmax)
        try:
            out.append(float(k * s))
        except OverflowError:
            out.append(math.copysign(INF, k))
    return out


def ref_bfp_lastdim(x: torch.Tensor, w: int, e: int, b: int) -> torch.Tensor:
    """Reference along the last dim; the float64 result is then rounded to x.dtype."""
    rows = x.double().reshape(-1, x.shape[-1]).tolist()
    out = []
    for row in rows:
        q = []
        for i in range(0, len(row), b):
            q += ref_block(row[i : i + b], w, e)
        out.append(q)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape).to(x.dtype)


def random_specials(n: int, seed: int) -> list[float]:
    """Values over the whole fp32 exponent range, with zeros, NaN, inf, subnormals."""
    rng = random.Random(seed)
    vals = []
    for _ in range(n):
        r = rng.random()
        if r < 0.03:
            vals.append(rng.choice([NAN, INF, -INF]))
        elif r < 0.08:
            vals.append(0.0)
        elif r < 0.15:
            vals.append(rng.choice([-1, 1]) * rng.randint(1, 2**20) * 2.0**-149)
        elif r < 0.5:
            vals.append(rng.uniform(-1, 1) * 2.0 ** rng.randint(-130, 127))
        else:
            vals.append(rng.gauss(0, 1) * 2.0 ** rng.randint(-3, 3))
    return vals


# ---------------------------------------------------------------- hand-computed blocks


def test_brief_example_block():
    # max 1.0 -> E = 0, w = 4 -> s = 2^(0-2) = 0.25
    # 0.3/0.25 = 1.2 -> 1; -0.7/0.25 = -2.8 -> -3; 0.1/0.25 = 0.4 -> 0
    q = bfp_quantize(t([1.0, 0.3, -0.7, 0.1]), 4, block_size=4)
    assert_same(q, t([1.0, 0.25, -0.75, 0.0]))


def test_ties_round_half_to_even():
    # E = 0, s = 0.25: 0.125/s = 0.5 -> 0; 0.375/s = 1.5 -> 2; -0.625/s = -2.5 -> -2
    q = bfp_quantize(t([1.0, 0.125, 0.375, -0.625]), 4, block_size=4)
    assert_same(q, t([1.0, 0.0, 0.5, -0.5]))


def test_block_max_clamped_to_qmax():
    # 1.9375: E = 0, s = 0.25, 1.9375/s = 7.75 -> 8 -> clamp 7 -> 1.75
    assert_same(bfp_quantize(t([1.9375, -1.9375]), 4), t([1.75, -1.75]))


def test_power_of_two_max_exact_exponent():
    # max exactly 2.0 -> E = 1 (log2 would risk 0.99999...), s = 2^(1-2) = 0.5
    # 0.74/0.5 = 1.48 -> 1 -> 0.5 ; with E = 0 it would be 0.75
    assert_same(bfp_quantize(t([2.0, 0.74]), 4), t([2.0, 0.5]))
    # 2^-3 max: E = -3, s = 2^-5 (w = 4): 0.1/2^-5 = 3.2 -> 3 -> 0.09375
    assert_same(bfp_quantize(t([0.125, 0.1]), 4), t([0.125, 0.09375]))


def test_tail_block():
    # B = 4, length 6: block [1.0, 0.3, -0.7, 0.1] as above; tail [6.0, 0.9]:
    # E = 2, s = 2^(2-2) = 1: 6 -> 6, 0.9 -> 1
    x = t([1.0, 0.3, -0.7, 0.1, 6.0, 0.9])
    assert_same(bfp_quantize(x, 4, block_size=4), t([1.0, 0.25, -0.75, 0.0, 6.0, 1.0]))
    # if the tail were padded into a block with other data the result would differ:
    # a single block of 6 has E = 2, s = 1 -> [1, 0, -1, 0, 6, 1]
    assert_same(bfp_quantize(x, 4, block_size=8), t([1.0, 0.0, -1.0, 0.0, 6.0, 1.0]))


def test_length_shorter_than_block():
    assert_same(bfp_quantize(t([0.3, 0.9]), 4, block_size=16), t([0.25, 0.875]))


def test_block_size_one_is_per_element_exponent():
    # each element its own block: w = 3 keeps 2 magnitude bits at each element's scale
    # 0.3: E = -2, s = 2^-3: 2.4 -> 2 -> 0.25 ; 5.0: E = 2, s = 2: 2.5 -> 2 -> 4.0
    # 7.0: E = 2, s = 2: 3.5 -> 4 -> clamp 3 -> 6.0
    assert_same(bfp_quantize(t([0.3, 5.0, 7.0]), 3, block_size=1), t([0.25, 4.0, 6.0]))


def test_zero_blocks_stay_zero():
    x = t([0.0, 0.0, 0.0, 0.0, 1.0, 0.3, -0.7, 0.1, -0.0, 0.0])
    q = bfp_quantize(x, 4, block_size=4)
    assert_same(q, t([0.0, 0.0, 0.0, 0.0, 1.0, 0.25, -0.75, 0.0, 0.0, 0.0]))
    assert_same(bfp_quantize(torch.zeros(3, 7), 2, block_size=3), torch.zeros(3, 7))


def test_nan_stays_in_its_element():
    # blocks of 2, w = 4. [nan, 1.0]: NaN excluded from max, E = 0, s = 0.25
    # [0.3, 100.0]: E = 6, s = 2^4 = 16: 0.3 -> 0, 100/16 = 6.25 -> 6 -> 96
    # [nan, nan] stays; [nan, 0.0]: max 0 -> zero block
    x = t([NAN, 1.0, 0.3, 100.0, NAN, NAN, NAN, 0.0])
    q = bfp_quantize(x, 4, block_size=2)
    assert_same(q, t([NAN, 1.0, 0.0, 96.0, NAN, NAN, NAN, 0.0]))


def test_inf_saturates_block_exponent_and_element():
    # w = 8, e = 8: E = 127, s = 2^(127-6) = 2^121; +-inf -> +-127 * 2^121, 1.0 -> 0
    big = 127 * 2.0**121
    q = bfp_quantize(t([INF, 1.0, -INF, 2.0, 3.0, 0.5]), 8, block_size=2)
    assert_same(q, t([big, 0.0, -big, 0.0, 3.0, 0.5]))
    # e = 5: E_max = 15, s = 2^(15-6) = 512: inf -> 127 * 512 = 65024
    q = bfp_quantize(t([INF, 1.0, -INF, 1024.0]), 8, exponent_bits=5, block_size=4)
    assert_same(q, t([65024.0, 0.0, -65024.0, 1024.0]))


def test_inf_when_max_exceeds_fp32_range():
    # w = 31: +-max = (2^30 - 1) * 2^98 rounds to +-inf in fp32 (documented)
    q = bfp_quantize(t([INF, -INF, 1.0]), 31, block_size=3)
    assert_same(q, t([INF, -INF, 0.0]))


def test_large_finite_values_e_clamp_top():
    fmax = torch.finfo(torch.float32).max  # (2 - 2^-23) * 2^127, E = 127
    # w = 16: s = 2^(127-14) = 2^113; fmax/s = 32768 - 2^-9 -> 32768 -> clamp 32767
    # 1.5 * 2^127 / s = 24576 exact; 1.0/s -> 0
    x = t([fmax, 1.5 * 2.0**127, 1.0])
    assert_same(bfp_quantize(x, 16), t([32767 * 2.0**113, 1.5 * 2.0**127, 0.0]))
    # w = 31: s = 2^98, fmax/s = 2^30 - 2^6 is an integer -> exact
    assert_same(bfp_quantize(x, 31), t([fmax, 1.5 * 2.0**127, 0.0]))


def test_e_clamp_bottom_and_subnormals():
    # 2^-140 alone: floor(log2) = -140 -> clamped to -127
    # w = 8: s = 2^(-127-6) = 2^-133: 2^-140/s = 2^-7 -> 0
    assert_same(bfp_quantize(t([2.0**-140]), 8), t([0.0]))
    # w = 16: s = 2^-141: 2^-140 -> 2 -> exact; 3 * 2^-149 / s = 3 * 2^-8 -> 0
    x = t([2.0**-140, 3 * 2.0**-149])
    assert_same(bfp_quantize(x, 16), t([2.0**-140, 0.0]))
    # w = 31: s = 2^-156 (2^156 overflows fp32, must be split): everything exact
    assert_same(bfp_quantize(x, 31), x)
    x = t([2.0**-130, 2.0**-149, -(2.0**-127)])
    assert_same(bfp_quantize(x, 31), x)
    # w = 16, E = -127: s = 2^-141: 2^-130 exact, 2^-149/s = 2^-8 -> 0
    assert_same(bfp_quantize(x, 16), t([2.0**-130, 0.0, -(2.0**-127)]))


def test_normal_max_with_subnormal_result():
    # max 2^-126 -> E = -126, w = 4, s = 2^-128: 1.5 * 2^-128 / s = 1.5 -> 2 -> 2^-127
    # (a subnormal result), 2^-129 / s = 0.5 -> 0 (tie to even)
    x = t([2.0**-126, 1.5 * 2.0**-128, 2.0**-129])
    q = bfp_quantize(x, 4)
    assert_same(q, t([2.0**-126, 2.0**-127, 0.0]))


def test_width_two():
    # qmax = 1, s = 2^E. [1.5, 0.4, -0.6, -1.0]: E = 0, s = 1 -> 1.5 -> 2 -> clamp 1
    # 0.4 -> 0, -0.6 -> -1, -1 -> -1 ; [0.5, -0.5]+[1.0]: ties -> 0
    q = bfp_quantize(t([1.5, 0.4, -0.6, -1.0, 1.0, 0.5, -0.5, 0.0]), 2, block_size=4)
    assert_same(q, t([1.0, 0.0, -1.0, -1.0, 1.0, 0.0, -0.0, 0.0]))


def test_small_exponent_bits_clamp():
    # e = 2: E in [-1, 1]. max 8 -> E = 3 clamped to 1, w = 4, s = 2^(1-2) = 0.5
    # 8/0.5 = 16 -> 7 -> 3.5 ; 0.3/0.5 = 0.6 -> 1 -> 0.5
    q = bfp_quantize(t([8.0, 0.3]), 4, exponent_bits=2)
    assert_same(q, t([3.5, 0.5]))
    # max 0.01 -> E = -7 clamped to -1, s = 2^-3 = 0.125: 0.01/0.125 = 0.08 -> 0
    assert_same(bfp_quantize(t([0.01, -0.07]), 4, exponent_bits=2), t([0.0, -0.125]))


def test_dim0_versus_dim_last():
    x = t([[1.0, 0.3], [6.0, 0.9]])
    # rows: [1.0, 0.3] E = 0, s = 0.25 -> [1.0, 0.25]; [6.0, 0.9] E = 2, s = 1 -> [6, 1]
    assert_same(bfp_quantize(x, 4, block_size=2, dim=-1), t([[1.0, 0.25], [6.0, 1.0]]))
    assert_same(bfp_quantize(x, 4, block_size=2, dim=1), t([[1.0, 0.25], [6.0, 1.0]]))
    # columns: [1.0, 6.0] E = 2, s = 1 -> [1, 6]; [0.3, 0.9] E = -1, s = 2^-3:
    # 2.4 -> 2 -> 0.25, 7.2 -> 7 -> 0.875
    assert_same(bfp_quantize(x, 4, block_size=2, dim=0), t([[1.0, 0.25], [6.0, 0.875]]))


def test_three_d_any_dim_against_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g) * torch.logspace(-3, 3, 7)
    for dim in (0, 1, 2, -1, -2):
        q = bfp_quantize(x, 5, block_size=3, dim=dim)
        assert q.shape == x.shape and q.is_contiguous()
        xm = x.movedim(dim, -1)
        expected = ref_bfp_lastdim(xm, 5, 8, 3).movedim(-1, dim)
        assert_same(q, expected)


@pytest.mark.parametrize(
    "w,e,b",
    [
        (2, 8, 4),
        (3, 8, 16),
        (4, 8, 1),
        (8, 8, 16),
        (8, 5, 7),
        (16, 8, 16),
        (24, 8, 5),
        (26, 8, 3),
        (31, 8, 16),
        (31, 3, 2),
        (6, 2, 16),
    ],
)
def test_matches_exact_reference_on_random_specials(w, e, b):
    vals = random_specials(16 * 37, seed=w * 100 + e * 10 + b)
    x = t(vals).reshape(16, 37)
    assert_same(bfp_quantize(x, w, exponent_bits=e, block_size=b), ref_bfp_lastdim(x, w, e, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes_preserved(dtype):
    x = t([1.0, 0.3, -0.7, 0.1, 6.0, 0.9], dtype)
    q = bfp_quantize(x, 4, block_size=4)
    assert q.dtype == dtype
    assert_same(q, t([1.0, 0.25, -0.75, 0.0, 6.0, 1.0], dtype))
    # w = 8 on random data: the fp32 result is representable in the dtype, so the cast
    # back is exact and equals the reference on the (exactly widened) input
    x = (torch.randn(8, 32, generator=torch.Generator().manual_seed(1)) * 10).to(dtype)
    q = bfp_quantize(x, 8, block_size=16)
    assert q.dtype == dtype
    ref = ref_bfp_lastdim(x.float(), 8, 8, 16)
    assert torch.equal(q.float(), ref)


def test_float64_computed_in_float64():
    # 1 + 2^-40 is not an fp32 number; at w = 31 the grid step for E = 0 is 2^-29
    x = torch.tensor([1.0 + 2.0**-30, 2.0**-40], dtype=torch.float64)
    q = bfp_quantize(x, 31)
    assert q.dtype == torch.float64
    assert_same(q, torch.tensor([1.0, 0.0], dtype=torch.float64))  # 0.5 ties to even


# ------------------------------------------------------------------------- properties


@pytest.mark.parametrize("w", [2, 3, 4, 8, 16, 31])
@pytest.mark.parametrize("b", [1, 5, 16])
def test_idempotent_nearest(w, b):
    g = torch.Generator().manual_seed(w * 31 + b)
    x = torch.randn(6, 50, generator=g) * torch.logspace(-20, 20, 50)
    q = bfp_quantize(x, w, block_size=b)
    assert torch.equal(bfp_quantize(q, w, block_size=b), q)


@pytest.mark.parametrize("w", [3, 4, 8, 12])
def test_error_at_most_half_step_when_not_clamped(w):
    b = 8
    g = torch.Generator().manual_seed(w)
    x = torch.randn(40, 64, generator=g).double() * 3
    x = x.float()
    q = bfp_quantize(x, w, block_size=b).double()
    qmax = 2 ** (w - 1) - 1
    xs = x.double().tolist()
    qs = q.tolist()
    for row_x, row_q in zip(xs, qs):
        for i in range(0, len(row_x), b):
            blk = row_x[i : i + b]
            big = math.frexp(max(abs(v) for v in blk))[1] - 1
            s = 2.0 ** (big - (w - 2))
            for xv, qv in zip(blk, row_q[i : i + b]):
                if abs(xv) / s <= qmax:  # no clamping
                    assert abs(xv - qv) <= s / 2
                    assert qv / s == round(qv / s)  # on the grid


def test_stochastic_unbiased_and_neighbours_only():
    n = 20000
    # per row the block [1.0, 0.3, -0.7, 0.1]: E = 0, s = 0.25
    x = t([1.0, 0.3, -0.7, 0.1]).repeat(n, 1)
    g = torch.Generator().manual_seed(1234)
    q = bfp_quantize(x, 4, block_size=4, rounding="stochastic", generator=g)
    assert torch.all(q[:, 0] == 1.0)  # on the grid: never moves
    for col, (lo, hi), p_up in [
        (1, (0.25, 0.5), 0.2),
        (2, (-0.75, -0.5), 0.2),
        (3, (0.0, 0.25), 0.4),
    ]:
        c = q[:, col].double()
        assert torch.all((c == lo) | (c == hi))
        # mean error ~ 0 within 5 standard errors: sd of one draw = s*sqrt(p(1-p))
        se = 0.25 * math.sqrt(p_up * (1 - p_up) / n)
        assert abs(c.mean().item() - x[0, col].item()) < 5 * se


def test_stochastic_reproducible_with_seeded_generator():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    a = bfp_quantize(x, 4, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    b = bfp_quantize(x, 4, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    c = bfp_quantize(x, 4, rounding="stochastic", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # each element at one of the two grid points around the nearest-rounded value
    near = bfp_quantize(x, 4)
    step = (near - a).abs()
    nonzero = step[step > 0]
    assert nonzero.numel() > 0
    # the difference from nearest is at most one step: both are grid neighbours of x
    s = 2.0 ** (torch.frexp(x.abs().reshape(64, 3, 16).amax(-1))[1] - 1 - 2)
    s = s.repeat_interleave(16, dim=-1)
    assert torch.all(step <= s)


def test_stochastic_clamps_and_keeps_specials():
    x = t([1.9375, NAN, INF, -INF])
    q = bfp_quantize(
        x, 8, block_size=1, rounding="stochastic", generator=torch.Generator().manual_seed(0)
    )
    big = 127 * 2.0**121
    # 1.9375: E = 0, s = 2^-6, 124 exactly -> stays
    assert_same(q, t([1.9375, NAN, big, -big]))


# ------------------------------------------------------------------ shapes, API, args


def test_width_32_is_identity_same_object():
    x = torch.randn(3, 4)
    assert bfp_quantize(x, 32) is x
    assert BFP(32).quantize(x) is x
    assert BFP(32).is_identity


def test_empty_and_scalar():
    e = torch.empty(0, 5)
    assert bfp_quantize(e, 4).shape == (0, 5)
    assert bfp_quantize(torch.empty(5, 0), 4, dim=-1).shape == (5, 0)
    # scalar 0.3: E = -2, w = 4, s = 2^-4: 4.8 -> 5 -> 0.3125
    assert_same(bfp_quantize(torch.tensor(0.3), 4), torch.tensor(0.3125))


def test_requires_grad_input_does_not_crash_and_is_not_modified():
    x = torch.randn(4, 16, requires_grad=True)
    before = x.detach().clone()
    q = bfp_quantize(x, 4)
    assert not q.requires_grad
    assert torch.equal(x.detach(), before)


def test_format_object():
    f = BFP(4, block_size=4)
    assert (f.width, f.exponent_bits, f.block_size) == (4, 8, 4)
    assert f.max_exponent == 127 and f.max_int == 7
    assert f.bits_per_element == 4 + 8 / 4
    x = t([1.0, 0.3, -0.7, 0.1, 6.0, 0.9])
    assert_same(f.quantize(x), bfp_quantize(x, 4, block_size=4))
    assert_same(f.quantize(x.reshape(6, 1), dim=0), bfp_quantize(x, 4, block_size=4).reshape(6, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.width = 8  # type: ignore[misc]
    assert BFP(8) == BFP(8, 8, 16) and hash(BFP(8)) == hash(BFP(8, 8, 16))


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"width": 1}, ["width", "2..32"]),
        ({"width": 33}, ["width", "2..32"]),
        ({"width": 8.0}, ["width", "2..32"]),
        ({"width": True}, ["width", "2..32"]),
        ({"width": 8, "exponent_bits": 1}, ["exponent_bits", "2..8"]),
        ({"width": 8, "exponent_bits": 9}, ["exponent_bits", "2..8"]),
        ({"width": 8, "block_size": 0}, ["block_size", ">= 1"]),
        ({"width": 8, "block_size": 2.5}, ["block_size", ">= 1"]),
        ({"width": 8, "rounding": "floor"}, ["rounding", "nearest", "stochastic"]),
        ({"width": 8, "dim": 2}, ["dim", "-2..1"]),
        ({"width": 8, "generator": 3}, ["generator", "torch.Generator"]),
        ({"width": 32, "rounding": "up"}, ["rounding", "nearest"]),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, words):
    with pytest.raises(ValueError) as info:
        bfp_quantize(torch.ones(2, 3), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_tensor_arguments():
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        bfp_quantize([1.0, 2.0], 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x.dtype"):
        bfp_quantize(torch.ones(3, dtype=torch.int32), 8)


@pytest.mark.parametrize(
    "args,word",
    [((1,), "width"), ((8, 9), "exponent_bits"), ((8, 8, 0), "block_size")],
)
def test_format_object_validates(args, word):
    with pytest.raises(ValueError, match=word):
        BFP(*args)


def test_non_contiguous_input():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 12, generator=g)
    xt = x.T  # non-contiguous view, shape [12, 20]
    assert not xt.is_contiguous()
    q = bfp_quantize(xt, 4, block_size=5, dim=-1)
    assert q.is_contiguous()
    assert torch.equal(q, bfp_quantize(xt.contiguous(), 4, block_size=5, dim=-1))
    assert torch.equal(q.T, bfp_quantize(x, 4, block_size=5, dim=0))
