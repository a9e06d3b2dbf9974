"""The rounding primitives of dsq_fairseq.quant.rounding."""

from __future__ import annotations

import math

import pytest
import torch

from dsq_fairseq.quant import ROUNDING_MODES, bfp_quantize, round_nearest, round_stochastic
from dsq_fairseq.quant.rounding import (
    apply_rounding,
    apply_rounding_,
    draw_key,
    uniform_from_key,
    uniform_like,
)

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


def _lowbias32(h: int) -> int:
    """The stream's hash written from its definition in plain Python integers."""
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_random_stream_follows_its_definition():
    """u at index i = (mix(mix(lo32(i) ^ k0) ^ hi32(i) ^ k1) >> 8) / 2^24, checked against plain
    Python integers at indices that cross the 32-bit boundary; one key per draw from the
    generator; u in [0, 1) on the 2^-24 grid."""
    g = torch.Generator().manual_seed(5)
    key = draw_key(g, "cpu")
    assert key.dtype == torch.int64 and key.shape == (2,)
    assert torch.equal(key, draw_key(torch.Generator().manual_seed(5), "cpu"))
    assert not torch.equal(key, draw_key(g, "cpu"))  # the generator advanced
    assert 0 <= key.min() and key.max() < 2**32
    k0, k1 = key.tolist()
    index = torch.tensor([0, 1, 2, 12345, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3])
    got = uniform_from_key(key, index)
    for i, u in zip(index.tolist(), got.tolist()):
        h = _lowbias32(_lowbias32((i & 0xFFFFFFFF) ^ k0) ^ (i >> 32) ^ k1)
        assert u == (h >> 8) / 2**24
    u = uniform_like(key, (3, 5))
    assert torch.equal(u.view(-1), uniform_from_key(key, torch.arange(15)))


def test_random_stream_is_uniform_and_uncorrelated():
    """Statistics of 2^20 consecutive draws: chi-square over 64 bins, mean, variance and the
    lag-1 / lag-16 correlations within 5 standard errors of a uniform i.i.d. stream."""
    n = 2**20
    u = uniform_like(draw_key(torch.Generator().manual_seed(0), "cpu"), (n,)).double()
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, 64, 0, 1)
    chi2 = (((counts - n / 64) ** 2) / (n / 64)).sum().item()
    assert chi2 < 63 + 5 * math.sqrt(2 * 63)
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    c = u - 0.5
    for lag in (1, 16):
        corr = (c[:-lag] * c[lag:]).mean().item() / (1 / 12)
        assert abs(corr) < 5 / math.sqrt(n)


def test_bfp_stochastic_draws_follow_the_element_not_the_block_layout():
    """u belongs to an element's position in x: with blocks of one element the block dim can't
    change any value, so dim=0 and dim=-1 must give the same result for the same seed."""
    x = torch.randn(24, 40) * 5
    a = bfp_quantize(x, 4, block_size=1, dim=0, rounding="stochastic",
                     generator=torch.Generator().manual_seed(2))
    b = bfp_quantize(x, 4, block_size=1, dim=-1, rounding="stochastic",
                     generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = bfp_quantize(x, 4, block_size=1, dim=-1, rounding="stochastic",
                     generator=torch.Generator().manual_seed(3))
    assert not torch.equal(a, c)
