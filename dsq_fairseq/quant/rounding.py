"""Rounding primitives shared by every number format in :mod:`dsq_fairseq.quant`.

Two modes, named by the strings accepted everywhere as ``rounding=``:

* ``"nearest"`` -- round half to even (IEEE 754 default, ``torch.round``):
  :math:`\\mathrm{rne}(y) = \\lfloor y \\rceil`, ties go to the even integer
  (``0.5 -> 0``, ``1.5 -> 2``, ``-2.5 -> -2``).
* ``"stochastic"`` -- :math:`\\lfloor y \\rfloor + [u < y - \\lfloor y \\rfloor]`
  with :math:`u \\in [0, 1)` uniform and independent per element, so
  :math:`E[\\mathrm{sr}(y)] = y` (unbiased) and the result is always one of the two
  integers that bracket ``y``.

The random stream (counter-based, so a vectorised kernel can compute it in registers instead of
reading a tensor of random numbers; the reference below and the native / compiled fast paths
compute the same bits):

* one **key** per quantization: two 32-bit words ``k0, k1`` drawn from the caller's
  ``torch.Generator`` (:func:`draw_key`: ``torch.randint(0, 2**32, (2,))``), so the same seeded
  generator gives the same stream, and every call advances it;
* element ``i`` (its row-major flat index in the tensor being rounded; for the block formats,
  in the *input's* layout, whatever the block dimension) gets
  ``h = mix(mix((i mod 2**32) ^ k0) ^ (i div 2**32) ^ k1)`` and ``u = (h >> 8) * 2**-24`` --
  24 random bits, so the probability of rounding up is the fractional part quantised to
  multiples of ``2**-24``. ``mix`` is the bijective 32-bit integer hash "lowbias32" (C. Wellons,
  hash-prospector): ``h ^= h >> 16; h *= 0x7feb352d; h ^= h >> 15; h *= 0x846ca68b;
  h ^= h >> 16`` (mod ``2**32``). Keyed at both ends, consecutive counters give unrelated ``u``
  (``tests/test_quant_rounding.py`` checks uniformity and neighbour correlation).

NaN stays NaN and ``±inf`` stays ``±inf`` in both modes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ROUNDING_MODES: tuple[str, ...] = ("nearest", "stochastic")
"""The values accepted by every ``rounding=`` argument of this package."""

MIX_MULTIPLIERS: tuple[int, int] = (0x7FEB352D, 0x846CA68B)
"""The two odd multipliers of the lowbias32 hash (``mix`` above)."""

_MASK32 = 0xFFFFFFFF


def draw_key(generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """The key of one stochastic rounding: int64 ``[2]`` on ``device``, values in
    ``[0, 2**32)``, drawn from ``generator`` (``None``: torch's default for ``device``)."""
    return torch.randint(0, 2**32, (2,), generator=generator, device=device, dtype=torch.int64)


def _mul32(h: Tensor, c: int) -> Tensor:
    """``h * c mod 2**32`` for int64 ``h`` in ``[0, 2**32)`` without int64 overflow: the
    product split at bit 16 of ``c``."""
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def mix32(h: Tensor) -> Tensor:
    """lowbias32 of int64 ``h`` holding values in ``[0, 2**32)`` (same range out)."""
    h = h ^ (h >> 16)
    h = _mul32(h, MIX_MULTIPLIERS[0])
    h = h ^ (h >> 15)
    h = _mul32(h, MIX_MULTIPLIERS[1])
    return h ^ (h >> 16)


def uniform_from_key(key: Tensor, index: Tensor) -> Tensor:
    """fp32 ``u`` of the stream ``key`` (from :func:`draw_key`) at the int64 element indices
    ``index`` (any shape, values >= 0; broadcast with nothing): ``u`` in ``[0, 1)``, multiples
    of ``2**-24``, ``index``'s shape and device."""
    h = mix32((index & _MASK32) ^ key[0])
    h = mix32(h ^ ((index >> 32) ^ key[1]))
    return (h >> 8).to(torch.float32) * 2.0**-24


def uniform_like(key: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """``u`` of the stream ``key`` for a tensor of ``shape``: element ``i`` (row-major flat
    index) gets :func:`uniform_from_key` at ``i``. fp32, ``shape``, ``key``'s device."""
    index = torch.arange(math.prod(shape), device=key.device, dtype=torch.int64)
    return uniform_from_key(key, index).view(shape)


def round_nearest(y: Tensor) -> Tensor:
    """Round to the nearest integer, ties to even. Returns a new tensor of ``y``'s dtype."""
    return torch.round(y)


def _round_up_where(y: Tensor, u: Tensor) -> Tensor:
    """``floor(y) + (u < y - floor(y))`` written over ``y`` (returned)."""
    lo = torch.floor(y)
    # y - floor(y) is exact for |y| < 2**24 (fp32); inf - inf = NaN compares False,
    # so ±inf stays ±inf, and NaN stays NaN through floor().
    frac = y.sub_(lo)
    return lo.add_(u < frac)


def round_stochastic(
    y: Tensor, generator: torch.Generator | None = None, u: Tensor | None = None
) -> Tensor:
    """Stochastic rounding: ``floor(y) + (u < y - floor(y))``.

    Args:
        y: floating-point tensor, any shape and device.
        generator: source of the key (:func:`draw_key`); ``None`` uses torch's default
            generator for ``y.device``. Must live on ``y.device``. Ignored when ``u`` is given.
        u: the uniforms to use, ``y``'s shape (e.g. :func:`uniform_like` of another layout);
            ``None``: ``uniform_like(draw_key(generator), y.shape)``.

    Returns:
        A new tensor of ``y``'s shape and dtype whose every element is ``floor(y)`` or
        ``floor(y) + 1``; NaN and ``±inf`` are passed through.
    """
    return apply_rounding_(y.clone(), "stochastic", generator, u)


def apply_rounding(y: Tensor, rounding: str, generator: torch.Generator | None = None) -> Tensor:
    """Round ``y`` to integers with the named mode (``"nearest"`` or ``"stochastic"``).

    ``generator`` is used only by ``"stochastic"``. Raises ``ValueError`` for any other
    mode name.
    """
    if rounding == "nearest":
        return round_nearest(y)
    if rounding == "stochastic":
        return round_stochastic(y, generator)
    raise ValueError(f"rounding must be one of {ROUNDING_MODES!r}, got {rounding!r}")


def apply_rounding_(
    y: Tensor, rounding: str, generator: torch.Generator | None = None, u: Tensor | None = None
) -> Tensor:
    """:func:`apply_rounding` that may overwrite and return ``y`` (saves allocations).

    Same values as :func:`apply_rounding` (and the same random draws for the same
    generator state); ``u``: as in :func:`round_stochastic`. Callers must not use ``y``
    afterwards except via the result.
    """
    if rounding == "nearest":
        return y.round_()
    if rounding == "stochastic":
        if u is None:
            u = uniform_like(draw_key(generator, y.device), y.shape)
        return _round_up_where(y, u)
    raise ValueError(f"rounding must be one of {ROUNDING_MODES!r}, got {rounding!r}")
