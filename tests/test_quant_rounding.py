"""The rounding primitives of dsq_fairseq.quant.rounding."""

from __future__ import annotations

import math

import pytest
import torch

from dsq_fairseq.quant import ROUNDING_MODES, round_nearest, round_stochastic
from dsq_fairseq.quant.rounding import apply_rounding, apply_rounding_

NAN = float("nan")
INF = float("inf")


def test_modes():
    assert ROUNDING_MODES == ("nearest", "stochastic")


def test_round_nearest_half_to_even():
    y = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 2.51, NAN, INF])
    expected = torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 0.0, 3.0, NAN, INF])
    torch.testing.assert_close(round_nearest(y), expected, rtol=0, atol=0, equal_nan=True)


def test_round_stochastic_neighbours_unbiased_reproducible():
    n = 20000
    y = torch.tensor([2.25, -2.25, 3.0, -0.7]).repeat(n, 1)
    g = torch.Generator().manual_seed(0)
    r = round_stochastic(y, g)
    assert r.dtype == y.dtype and r.shape == y.shape
    for col, lo in enumerate([2.0, -3.0, 3.0, -1.0]):
        c = r[:, col]
        assert torch.all((c == lo) | (c == lo + 1))
    assert torch.all(r[:, 2] == 3.0)  # integers never move
    for col in (0, 1, 3):
        p = y[0, col].item() - math.floor(y[0, col].item())
        se = math.sqrt(p * (1 - p) / n)
        assert abs(r[:, col].double().mean().item() - y[0, col].item()) < 5 * se
    assert torch.equal(r, round_stochastic(y, torch.Generator().manual_seed(0)))
    assert not torch.equal(r, round_stochastic(y, torch.Generator().manual_seed(1)))


def test_round_stochastic_specials_and_float64():
    y = torch.tensor([NAN, INF, -INF], dtype=torch.float64)
    r = round_stochastic(y, torch.Generator().manual_seed(0))
    assert r.dtype == torch.float64
    torch.testing.assert_close(r, y, rtol=0, atol=0, equal_nan=True)


def test_inplace_variant_matches():
    y = torch.randn(100) * 10
    for mode in ROUNDING_MODES:
        a = apply_rounding(y, mode, torch.Generator().manual_seed(3))
        b = apply_rounding_(y.clone(), mode, torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="rounding must be one of"):
        apply_rounding(y, "up")
    with pytest.raises(ValueError, match="rounding must be one of"):
        apply_rounding_(y, "up")
