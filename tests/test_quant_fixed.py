"""Fixed(w) (BFP with the whole tensor as one block) against DESIGN.md section 1."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dsq_fairseq.quant import Fixed, bfp_quantize, fixed_quantize

NAN = float("nan")
INF = float("inf")


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def test_hand_computed_vector():
    # max 3 -> E = 1, w = 4 -> s = 2^(1-2) = 0.5
    # 3/0.5 = 6 -> 3.0; 0.4/0.5 = 0.8 -> 1 -> 0.5; -1.1/0.5 = -2.2 -> -2 -> -1.0
    # tie: 0.25/0.5 = 0.5 -> 0; 0.75/0.5 = 1.5 -> 2 -> 1.0
    q = fixed_quantize(t([3.0, 0.4, -1.1, 0.25, 0.75]), 4)
    assert_same(q, t([3.0, 0.5, -1.0, 0.0, 1.0]))


def test_one_scale_for_whole_tensor():
    # whole 2x2 tensor: max 100 -> E = 6, w = 4, s = 2^4 = 16
    # 100/16 = 6.25 -> 96; 1.0 -> 0; -30/16 = -1.875 -> -2 -> -32; 8/16 = 0.5 -> 0
    x = t([[100.0, 1.0], [-30.0, 8.0]])
    assert_same(fixed_quantize(x, 4), t([[96.0, 0.0], [-32.0, 0.0]]))
    # per-row BFP would give the second row its own scale: E = 4, s = 4:
    # -30/4 = -7.5 -> -8 (tie to even) -> clamp -7 -> -28; 8/4 = 2 -> 8
    assert_same(bfp_quantize(x, 4, block_size=2), t([[96.0, 0.0], [-28.0, 8.0]]))


def test_equals_bfp_with_one_block():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=g) * 7
    for w in (2, 5, 8, 16, 31):
        assert torch.equal(
            fixed_quantize(x, w),
            bfp_quantize(x.flatten(), w, block_size=x.numel()).reshape(x.shape),
        )


def test_clamp_of_maximum():
    # 1.9375: E = 0, s = 0.25: 7.75 -> 8 -> clamp 7 -> 1.75
    assert_same(fixed_quantize(t([1.9375, -0.1]), 4), t([1.75, -0.0]))


def test_zero_nan_inf():
    assert_same(fixed_quantize(torch.zeros(2, 3), 4), torch.zeros(2, 3))
    # NaN excluded from the max: max 1 -> E = 0, s = 0.25
    assert_same(fixed_quantize(t([NAN, 1.0, 0.3]), 4), t([NAN, 1.0, 0.25]))
    # inf: E = 127, w = 8, s = 2^121: +-inf -> +-127 * 2^121, everything finite -> 0
    big = 127 * 2.0**121
    assert_same(fixed_quantize(t([INF, 5.0, -INF, NAN]), 8), t([big, 0.0, -big, NAN]))


def test_subnormals_and_exponent_clamp():
    # max 2^-140 -> E clamped to -127; w = 16: s = 2^-141
    x = t([2.0**-140, 3 * 2.0**-149])
    assert_same(fixed_quantize(x, 16), t([2.0**-140, 0.0]))
    # w = 31: s = 2^-156, exact
    assert_same(fixed_quantize(x, 31), x)


def test_width_two():
    # s = 2^E: max 1.5 -> E = 0: 1.5 -> 2 -> clamp 1; -0.6 -> -1; 0.5 -> 0 (tie to even)
    assert_same(fixed_quantize(t([1.5, -0.6, 0.5]), 2), t([1.0, -1.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    q = fixed_quantize(t([3.0, 0.4, -1.1], dtype), 4)
    assert q.dtype == dtype
    assert_same(q, t([3.0, 0.5, -1.0], dtype))


def test_idempotent_and_error_bound():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 20, generator=g)
    for w in (3, 6, 12):
        q = fixed_quantize(x, w)
        assert torch.equal(fixed_quantize(q, w), q)
        big = math.frexp(x.abs().max().item())[1] - 1
        s = 2.0 ** (big - (w - 2))
        unclamped = x.abs() / s <= 2 ** (w - 1) - 1
        assert unclamped.float().mean() > 0.9
        assert (x - q)[unclamped].abs().max().item() <= s / 2


def test_stochastic_unbiased_reproducible_neighbours():
    n = 20000
    # 0.3 with tensor max 1.0 (E = 0), w = 4, s = 0.25: P(0.5) = 0.2, P(0.25) = 0.8
    x = torch.full((n,), 0.3)
    x[0] = 1.0
    q = fixed_quantize(x, 4, rounding="stochastic", generator=torch.Generator().manual_seed(11))
    body = q[1:].double()
    assert torch.all((body == 0.25) | (body == 0.5))
    se = 0.25 * math.sqrt(0.2 * 0.8 / (n - 1))
    assert abs(body.mean().item() - 0.3) < 5 * se
    again = fixed_quantize(x, 4, rounding="stochastic", generator=torch.Generator().manual_seed(11))
    assert torch.equal(q, again)


def test_width_32_identity_and_args():
    x = torch.randn(3)
    assert fixed_quantize(x, 32) is x
    assert Fixed(32).quantize(x) is x
    for bad in (1, 33, 8.5, None):
        with pytest.raises(ValueError, match=r"width must be an int in 2\.\.32"):
            fixed_quantize(x, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rounding must be one of"):
        fixed_quantize(x, 8, rounding="nearest_even")
    with pytest.raises(ValueError, match="generator"):
        fixed_quantize(x, 8, generator=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x.dtype"):
        fixed_quantize(torch.ones(2, dtype=torch.int64), 8)


def test_format_object():
    f = Fixed(4)
    x = t([[100.0, 1.0], [-30.0, 8.0]])
    assert_same(f.quantize(x), t([[96.0, 0.0], [-32.0, 0.0]]))
    assert_same(f.quantize(x, dim=0), f.quantize(x))  # dim accepted and ignored
    assert f.max_int == 7 and not f.is_identity and str(f) == "Fixed4"
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.width = 8  # type: ignore[misc]
    with pytest.raises(ValueError, match="width"):
        Fixed(0)


def test_requires_grad_and_empty():
    x = torch.randn(5, requires_grad=True)
    assert not fixed_quantize(x, 4).requires_grad
    assert fixed_quantize(torch.empty(0), 4).shape == (0,)
