"""Linear integer quantization, Int(w, granularity) -- DESIGN.md section 1.

Symmetric, scale ``max|x| / (2^(w-1) - 1)`` (not rounded to a power of two), one
scale per tensor, per channel or per token (Chitsaz et al.).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _validate as v
from ._format import WidthFormat
from .bfp import _compute_dtype, nan_free_abs
from .rounding import apply_rounding_

__all__ = ["Int", "int_quantize"]


def int_scale(xc: Tensor, width: int, granularity: str, dim: int) -> Tensor:
    """The scale ``S = max|x| / (2^(w-1)-1)`` of :func:`int_quantize` (NaN excluded, inf as the
    largest finite value): 0-d for ``granularity == "tensor"``, else one per vector along
    ``dim`` (keepdim). ``xc`` is already in the compute dtype; ``S == 0`` for an all-zero
    granule."""
    a = nan_free_abs(xc)
    if granularity == "tensor":
        amax = a.amax()
    else:
        amax = (a.reshape(1) if a.dim() == 0 else a).amax(dim=dim, keepdim=True)
    return amax / float(2 ** (width - 1) - 1)


def int_quantize(
    x: Tensor,
    width: int,
    granularity: str = "tensor",
    dim: int = -1,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fake-quantize ``x`` to symmetric linear integers Int(w).

    ``S = amax / (2^(w-1)-1)`` computed in the compute dtype (one rounding), then
    ``q = clamp(round(x / S), -(2^(w-1)-1), 2^(w-1)-1) * S``. ``amax = max|x|`` with NaN
    excluded and ``±inf`` counted as the compute dtype's largest finite value:

    * ``granularity="tensor"``: over the whole tensor (``dim`` is ignored);
    * ``"channel"`` / ``"token"``: over ``dim``, one scale per vector along ``dim``
      (``amax(dim, keepdim=True)``). The two compute the same thing; the name says the
      intent: for a weight ``[out, in]`` with ``dim=-1`` one scale per output channel,
      for an activation ``[..., features]`` with ``dim=-1`` one scale per token.

    An all-zero tensor/vector (``S = 0``) stays zero. NaN stays NaN; ``±inf`` becomes
    ``±(2^(w-1)-1) * S`` (which may round to ``±inf``). If ``amax`` is so small that
    ``S`` underflows to 0 (fp32: ``amax < ~2^-149 * (2^(w-1)-1)``) the vector becomes
    zero.

    Args:
        x: float32, bfloat16, float16 (or float64) tensor of any shape. Not modified.
        width: 2..32; 32 returns ``x`` itself (the same object, not a copy).
        granularity: ``"tensor"``, ``"channel"`` or ``"token"``.
        dim: the axis each per-channel / per-token vector runs along.
        rounding: ``"nearest"`` (half to even) or ``"stochastic"``.
        generator: ``torch.Generator`` on ``x.device`` for stochastic rounding.

    Returns:
        A new contiguous tensor (except for width 32) of ``x``'s shape, dtype and
        device, detached from autograd. fp32/bf16/fp16 are computed in fp32 (fp64 in
        fp64) and the result is rounded to the input dtype; unlike BFP, ``k * S`` is
        generally not exactly representable in bf16/fp16, so there the result is the
        nearest value of the input dtype.

    Raises:
        ValueError: for any argument outside the ranges above.
    """
    x = v.check_tensor(x)
    width = v.check_width(width)
    granularity = v.check_granularity(granularity)
    dim = v.check_dim(x, dim)
    rounding = v.check_rounding(rounding)
    generator = v.check_generator(generator)
    if width == 32:
        return x
    if x.numel() == 0:
        return x.detach().clone()
    qmax = float(2 ** (width - 1) - 1)
    with torch.no_grad():
        xc = x.detach().to(_compute_dtype(x.dtype))
        scale = int_scale(xc, width, granularity, dim)
        y = xc / torch.where(scale == 0, 1.0, scale)
        y = apply_rounding_(y, rounding, generator)
        y.clamp_(-qmax, qmax)
        y.mul_(scale)
        return y.reshape(x.shape).to(x.dtype).contiguous()


@dataclass(frozen=True)
class Int(WidthFormat):
    """Symmetric linear integer format Int(w) with a real-valued (fp32) scale ``S``.

    Representable values for a scale ``S`` (one per tensor / channel / token):

    .. math::
        q = k \\cdot S, \\quad k \\in \\{-(2^{w-1}-1), \\dots, 2^{w-1}-1\\}

    with ``S = max|x| / (2^(w-1)-1)`` over the granule, so the range is exactly
    ``[-max|x|, max|x|]`` (up to the rounding of ``S``) in ``2^w - 1`` levels.

    Rounding:

    .. math::
        q(x) = \\mathrm{clamp}\\big(\\mathrm{round}(x/S), -(2^{w-1}-1), 2^{w-1}-1\\big)
               \\cdot S

    round: half-to-even (``"nearest"``, error ``<= S/2``) or stochastic
    (``floor(x/S) + [u < frac(x/S)]``, unbiased). ``width == 32`` is the identity.

    Args:
        width: ``w`` in 2..32 (bits per element including the sign).
        granularity: ``"tensor"``, ``"channel"`` (per output row of a weight) or
            ``"token"`` (per row of an activation).
    """

    granularity: str = "tensor"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "granularity", v.check_granularity(self.granularity))

    def quantize(
        self,
        x: Tensor,
        dim: int = -1,
        rounding: str = "nearest",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:func:`int_quantize` with this format; ``dim`` is the axis of each channel /
        token vector (ignored for ``granularity="tensor"``)."""
        return int_quantize(
            x,
            self.width,
            granularity=self.granularity,
            dim=dim,
            rounding=rounding,
            generator=generator,
        )

    def __str__(self) -> str:
        return f"Int{self.width}({self.granularity})"
