"""Int(w, granularity) against DESIGN.md section 1: S = max|x| / (2^(w-1)-1)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dsq_fairseq.quant import Int, int_quantize

NAN = float("nan")
INF = float("inf")


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# rows chosen so that every scale and product is exact in fp32
W = [[3.5, -1.0, 0.4], [21.0, 10.0, -4.4], [0.0, 0.0, 0.0]]
# per row, w = 4 (qmax = 7):
#   [3.5, -1.0, 0.4]:  S = 0.5: -2 -> -1.0, 0.8 -> 1 -> 0.5
#   [21, 10, -4.4]:    S = 3 (not a power of two): 3.33 -> 3 -> 9, -1.47 -> -1 -> -3
#   zeros:             S = 0 -> stays zero
W_PER_ROW = [[3.5, -1.0, 0.5], [21.0, 9.0, -3.0], [0.0, 0.0, 0.0]]
# whole tensor: S = 21/7 = 3: 3.5/3 = 1.17 -> 3; -1/3 -> -0; 0.4/3 -> 0
W_PER_TENSOR = [[3.0, -0.0, 0.0], [21.0, 9.0, -3.0], [0.0, 0.0, 0.0]]


def test_per_tensor_with_ties():
    # S = 3.5/7 = 0.5: 0.4 -> 0.8 -> 1 -> 0.5; -1.1 -> -2.2 -> -2 -> -1.0
    # ties to even: 1.75 -> 3.5 -> 4 -> 2.0; 0.75 -> 1.5 -> 2 -> 1.0; 1.25 -> 2.5 -> 2
    x = t([3.5, 0.4, -1.1, 1.75, 0.75, 1.25])
    assert_same(int_quantize(x, 4), t([3.5, 0.5, -1.0, 2.0, 1.0, 1.0]))


def test_per_tensor_scale_not_power_of_two():
    assert_same(int_quantize(t(W), 4), t(W_PER_TENSOR))
    # "tensor" ignores dim
    assert_same(int_quantize(t(W), 4, "tensor", dim=0), t(W_PER_TENSOR))


def test_per_channel_weight_rows():
    assert_same(int_quantize(t(W), 4, "channel"), t(W_PER_ROW))
    assert_same(Int(4, "channel").quantize(t(W)), t(W_PER_ROW))
    # channels of a transposed weight run along dim 0
    assert_same(int_quantize(t(W).T, 4, "channel", dim=0), t(W_PER_ROW).T.contiguous())


def test_per_token_activation():
    # [batch 2, tokens 3, features 3]: one scale per (batch, token)
    x = torch.stack([t(W), -t(W)])
    expected = torch.stack([t(W_PER_ROW), -t(W_PER_ROW)])
    assert_same(int_quantize(x, 4, "token"), expected)
    assert_same(int_quantize(x, 4, "token", dim=2), expected)


def test_clamp_never_needed_for_nearest_but_grid_is_symmetric():
    # max maps to exactly qmax; w = 2 -> values {-S, 0, S} with S = max|x| = 2
    # 1/2 = 0.5 -> 0 (tie to even); -1.5/2 = -0.75 -> -1 -> -2; 0.5/2 -> 0
    assert_same(int_quantize(t([2.0, 1.0, -1.5, 0.5]), 2), t([2.0, 0.0, -2.0, 0.0]))
    assert_same(int_quantize(t([-2.0, 1.0]), 2), t([-2.0, 0.0]))


def test_zero_tensor_and_zero_rows():
    assert_same(int_quantize(torch.zeros(4, 5), 8), torch.zeros(4, 5))
    assert_same(int_quantize(torch.zeros(4, 5), 8, "token"), torch.zeros(4, 5))


def test_nan_and_inf():
    # NaN excluded from the max: S = 0.5
    assert_same(int_quantize(t([NAN, 3.5, 0.4]), 4), t([NAN, 3.5, 0.5]))
    assert_same(
        int_quantize(t([[NAN, NAN], [3.5, 0.4]]), 4, "channel"), t([[NAN, NAN], [3.5, 0.5]])
    )
    # inf counts as the largest finite fp32: S = fmax/7, finite values -> 0
    q = int_quantize(t([INF, 3.5, -INF]), 4)
    assert q[0] > 3e38 and q[1] == 0 and q[2] < -3e38


@pytest.mark.parametrize("w", [3, 4, 8, 16])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_error_bound_grid_and_idempotence(w, granularity):
    g = torch.Generator().manual_seed(w)
    x = torch.randn(16, 40, generator=g) * torch.logspace(-2, 2, 16).unsqueeze(1)
    q = int_quantize(x, w, granularity)
    qmax = 2 ** (w - 1) - 1
    xd = x.double()
    amax = xd.abs().amax() if granularity == "tensor" else xd.abs().amax(-1, keepdim=True)
    scale = amax / qmax
    k = q.double() / scale
    # on the grid (up to the fp32 rounding of S and of k * S: relative 2^-23), |k| <= qmax
    assert torch.all((k - k.round()).abs() <= 1e-3 + qmax * 2.0**-22)
    assert torch.all(k.round().abs() <= qmax)
    assert torch.all((xd - q.double()).abs() <= scale / 2 * (1 + 1e-5))
    if w <= 8:  # not exact for large w: S and k * S are rounded to fp32
        assert torch.equal(int_quantize(q, w, granularity), q)


def test_stochastic_unbiased_reproducible_neighbours():
    n = 20000
    # per token [3.5, 0.3]: S = 0.5, 0.3/S = 0.6 -> 0 or 1 (P = 0.6)
    x = t([3.5, 0.3]).repeat(n, 1)
    g = torch.Generator().manual_seed(99)
    q = int_quantize(x, 4, "token", rounding="stochastic", generator=g)
    assert torch.all(q[:, 0] == 3.5)
    c = q[:, 1].double()
    assert torch.all((c == 0.0) | (c == 0.5))
    se = 0.5 * math.sqrt(0.6 * 0.4 / n)
    assert abs(c.mean().item() - 0.3) < 5 * se
    again = int_quantize(
        x, 4, "token", rounding="stochastic", generator=torch.Generator().manual_seed(99)
    )
    assert torch.equal(q, again)
    other = int_quantize(
        x, 4, "token", rounding="stochastic", generator=torch.Generator().manual_seed(100)
    )
    assert not torch.equal(q, other)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    q = int_quantize(t([3.5, 0.4, -1.1], dtype), 4)
    assert q.dtype == dtype
    assert_same(q, t([3.5, 0.5, -1.0], dtype))
    q = int_quantize(t(W, dtype), 4, "channel")
    assert q.dtype == dtype
    assert torch.allclose(q.float(), t(W_PER_ROW), rtol=1e-2, atol=0)


def test_scalar_empty_requires_grad():
    q = int_quantize(torch.tensor(0.3), 4, "token")
    assert q.shape == () and abs(q.item() - 0.3) < 1e-7
    assert int_quantize(torch.empty(0, 3), 4, "channel").shape == (0, 3)
    x = torch.randn(3, 4, requires_grad=True)
    assert not int_quantize(x, 4, "channel").requires_grad


def test_width_32_identity():
    x = torch.randn(3, 4)
    assert int_quantize(x, 32, "channel") is x
    assert Int(32).quantize(x) is x and Int(32).is_identity


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"width": 1}, ["width", "2..32"]),
        ({"width": 64}, ["width", "2..32"]),
        ({"width": 8, "granularity": "row"}, ["granularity", "tensor", "channel", "token"]),
        ({"width": 8, "granularity": None}, ["granularity", "tensor"]),
        ({"width": 8, "dim": -3}, ["dim", "-2..1"]),
        ({"width": 8, "rounding": "Nearest"}, ["rounding", "nearest", "stochastic"]),
        ({"width": 8, "generator": "seed"}, ["generator", "torch.Generator"]),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, words):
    with pytest.raises(ValueError) as info:
        int_quantize(torch.ones(2, 3), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_format_object():
    f = Int(8, "token")
    assert f.max_int == 127 and str(f) == "Int8(token)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.granularity = "tensor"  # type: ignore[misc]
    with pytest.raises(ValueError, match="granularity"):
        Int(8, "block")
    with pytest.raises(ValueError, match="width"):
        Int(40)
