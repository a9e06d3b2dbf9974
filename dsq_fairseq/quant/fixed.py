"""Dynamic fixed point, Fixed(w) -- DESIGN.md section 1.

Fixed(w) is BFP(w, e=8) whose single block is the whole tensor: one power-of-two scale
per tensor, chosen from the tensor's maximum magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _validate as v
from ._format import WidthFormat
from .bfp import _compute_dtype, nan_free_abs, pow2_block_quantize

__all__ = ["Fixed", "fixed_quantize"]

FIXED_EXPONENT_BITS = 8


def fixed_quantize(
    x: Tensor,
    width: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fake-quantize ``x`` to dynamic fixed point Fixed(w): BFP(w, 8) with one block.

    With ``E = clamp(floor(log2(max|x|)), -127, 127)`` over the whole tensor (NaN
    excluded, ``E = 0`` for an all-zero tensor, ``E = 127`` if it holds ``±inf``) and
    ``s = 2^(E - (w-2))``: ``q = clamp(round(x / s), -(2^(w-1)-1), 2^(w-1)-1) * s``.

    Args:
        x: float32, bfloat16, float16 (or float64) tensor of any shape. Not modified.
        width: 2..32; 32 returns ``x`` itself (the same object, not a copy).
        rounding: ``"nearest"`` (half to even) or ``"stochastic"``.
        generator: ``torch.Generator`` on ``x.device`` for stochastic rounding.

    Returns:
        A new contiguous tensor (except for width 32) of ``x``'s shape, dtype and
        device, detached from autograd. Dtype handling, NaN/inf and exactness as in
        :func:`~dsq_fairseq.quant.bfp.bfp_quantize`.

    Raises:
        ValueError: for any argument outside the ranges above.
    """
    x = v.check_tensor(x)
    width = v.check_width(width)
    rounding = v.check_rounding(rounding)
    generator = v.check_generator(generator)
    if width == 32:
        return x
    if x.numel() == 0:
        return x.detach().clone()
    with torch.no_grad():
        xc = x.detach().to(_compute_dtype(x.dtype))
        amax = nan_free_abs(xc).amax()
        q = pow2_block_quantize(xc, amax, width, FIXED_EXPONENT_BITS, rounding, generator)
        return q.to(x.dtype).contiguous()


@dataclass(frozen=True)
class Fixed(WidthFormat):
    """Dynamic fixed point Fixed(w): ``w``-bit integers times one power-of-two scale.

    Representable values, for a tensor scale exponent ``E`` in ``[-127, 127]``:

    .. math::
        q = k \\cdot 2^{E-(w-2)}, \\quad k \\in \\{-(2^{w-1}-1), \\dots, 2^{w-1}-1\\}

    Rounding, with ``E = clamp(floor(log2 max|x|), -127, 127)`` over the whole tensor
    and ``s = 2^(E-(w-2))``:

    .. math::
        q(x) = \\mathrm{clamp}\\big(\\mathrm{round}(x/s), -(2^{w-1}-1), 2^{w-1}-1\\big)
               \\cdot s

    round: half-to-even (``"nearest"``, error ``<= s/2``) or stochastic (unbiased).
    This is BFP(w, 8, B = numel). ``width == 32`` is the identity.

    Args:
        width: ``w`` in 2..32 (bits per element including the sign).
    """

    @property
    def bits_per_element(self) -> float:
        """Storage cost: ``w`` bits per element (the one exponent is negligible)."""
        return float(self.width)

    def quantize(
        self,
        x: Tensor,
        dim: int = -1,
        rounding: str = "nearest",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:func:`fixed_quantize`; ``dim`` is accepted for a uniform interface and
        ignored (the scale is per tensor)."""
        return fixed_quantize(x, self.width, rounding=rounding, generator=generator)

    def __str__(self) -> str:
        return f"Fixed{self.width}"
