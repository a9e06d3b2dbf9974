"""Rounding primitives shared by every number format in :mod:`dsq_fairseq.quant`.

Two modes, named by the strings accepted everywhere as ``rounding=``:

* ``"nearest"`` -- round half to even (IEEE 754 default, ``torch.round``):
  :math:`\\mathrm{rne}(y) = \\lfloor y \\rceil`, ties go to the even integer
  (``0.5 -> 0``, ``1.5 -> 2``, ``-2.5 -> -2``).
* ``"stochastic"`` -- :math:`\\lfloor y \\rfloor + [u < y - \\lfloor y \\rfloor]`
  with :math:`u \\sim U[0, 1)` drawn independently per element, so
  :math:`E[\\mathrm{sr}(y)] = y` (unbiased) and the result is always one of the two
  integers that bracket ``y``. ``u`` comes from
  ``torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)``:
  the same seeded generator, shape and device give the same result. ``u`` has 24
  random bits, so the probability of rounding up is the fractional part quantised to
  multiples of ``2**-24``.

NaN stays NaN and ``±inf`` stays ``±inf`` in both modes.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROUNDING_MODES: tuple[str, ...] = ("nearest", "stochastic")
"""The values accepted by every ``rounding=`` argument of this package."""


def round_nearest(y: Tensor) -> Tensor:
    """Round to the nearest integer, ties to even. Returns a new tensor of ``y``'s dtype."""
    return torch.round(y)


def round_stochastic(y: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Stochastic rounding: ``floor(y) + (u < y - floor(y))``, ``u ~ U[0, 1)``.

    Args:
        y: floating-point tensor, any shape and device.
        generator: source of ``u``; ``None`` uses torch's default generator for
            ``y.device``. Must live on ``y.device``.

    Returns:
        A new tensor of ``y``'s shape and dtype whose every element is ``floor(y)`` or
        ``floor(y) + 1``; NaN and ``±inf`` are passed through.
    """
    u = torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)
    lo = torch.floor(y)
    # y - floor(y) is exact for |y| < 2**24 (fp32); inf - inf = NaN compares False,
    # so ±inf stays ±inf, and NaN stays NaN through floor().
    return torch.where(u < (y - lo), lo + 1, lo)


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


def apply_rounding_(y: Tensor, rounding: str, generator: torch.Generator | None = None) -> Tensor:
    """:func:`apply_rounding` that may overwrite and return ``y`` (saves allocations).

    Same values as :func:`apply_rounding` (and the same random draws for the same
    generator state). Callers must not use ``y`` afterwards except via the result.
    """
    if rounding == "nearest":
        return y.round_()
    if rounding == "stochastic":
        u = torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)
        lo = torch.floor(y)
        frac = y.sub_(lo)
        return lo.add_(u < frac)
    raise ValueError(f"rounding must be one of {ROUNDING_MODES!r}, got {rounding!r}")
