"""Block floating point, BFP(w, e, B) -- DESIGN.md section 1.

The shared-exponent arithmetic lives in :func:`pow2_block_quantize`, which
:mod:`.fixed` reuses with one block covering the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validate as v
from ._format import WidthFormat
from .rounding import apply_rounding_, draw_key, uniform_like

__all__ = ["BFP", "bfp_quantize", "pow2_block_quantize", "shared_exponent"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _exp2_halves(k: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(2**(k//2), 2**(k - k//2))`` for an int32 tensor ``k`` with ``|k| <= 252``.

    ``2**k`` itself may not exist in fp32 (the shifts here reach 156 = 29 + 127);
    each half does (``|half| <= 126``), and is built exactly from its fp32 bit
    pattern ``(half + 127) << 23`` -- no ``exp2``/``pow``/``log2``, which are not
    guaranteed exact. Multiplying by the two halves in turn is exact as long as the
    result stays in range, and otherwise rounds only once (see
    :func:`pow2_block_quantize`).
    """
    lo = k >> 1  # arithmetic shift: floor(k / 2)
    hi = k - lo
    a = ((lo + 127) << 23).view(torch.float32)
    b = ((hi + 127) << 23).view(torch.float32)
    return a.to(dtype), b.to(dtype)


def nan_free_abs(x: Tensor) -> Tensor:
    """``|x|`` with NaN -> 0 and inf -> the dtype's largest finite value."""
    return torch.nan_to_num_(x.abs(), nan=0.0)


def shared_exponent(amax: Tensor, exponent_bits: int = 8) -> Tensor:
    """Shared exponent ``E = floor(log2(amax))`` clamped to ``[-(2^(e-1)-1), 2^(e-1)-1]``.

    Computed exactly with ``torch.frexp`` (``frexp`` returns ``amax = m * 2**p`` with
    ``m`` in ``[0.5, 1)``, so ``E = p - 1``), which is exact for powers of two and
    subnormals, unlike ``log2``. ``amax == 0`` gives ``E = 0``; ``amax = inf`` (or the
    dtype's max, which :func:`nan_free_abs` substitutes for inf) gives the maximum.

    Args:
        amax: non-negative, NaN-free fp32/fp64 tensor of block maxima, any shape.
        exponent_bits: ``e`` in 2..8.

    Returns:
        int32 tensor of ``amax``'s shape.
    """
    emax = 2 ** (exponent_bits - 1) - 1
    _, p = torch.frexp(amax)
    e = (p - 1).clamp_(-emax, emax)
    e = torch.where(torch.isinf(amax), emax, e)
    return torch.where(amax == 0, 0, e).to(torch.int32)


def shared_exponent_from_bits(amax: Tensor, emax: int | Tensor) -> Tensor:
    """:func:`shared_exponent` of a NaN-free, finite-or-inf fp32 ``amax`` read from its exponent
    field, for ``emax = 2^(e-1)-1 <= 127`` (int or 0-d int tensor): equal for normal ``amax``; a
    subnormal one gives -127 (frexp: ``<= -127``) and inf 128 (the reference sees the largest
    finite value: 127), and both clamp to ``[-emax, emax]`` alike; ``amax == 0`` gives 0.
    Cheaper than ``frexp`` and traceable by ``torch.compile``. int32, ``amax``'s shape."""
    amax_bits = amax.view(torch.int32)
    e = torch.clamp((amax_bits >> 23) - 127, -emax, emax)
    return torch.where(amax_bits == 0, 0, e)


def pow2_block_quantize(
    x: Tensor,
    amax: Tensor,
    width: int,
    exponent_bits: int,
    rounding: str,
    generator: torch.Generator | None,
    u: Tensor | None = None,
) -> Tensor:
    """Quantize ``x`` to the grid ``k * 2^(E - (w-2))``, ``|k| <= 2^(w-1) - 1``.

    Args:
        x: fp32 or fp64 tensor (the compute dtype), not modified.
        amax: NaN-free block maxima of ``|x|``, same dtype, broadcastable to ``x``
            (e.g. ``[..., nblocks, 1]`` against ``[..., nblocks, B]``, or a scalar).
        width: ``w`` in 2..31. exponent_bits: ``e`` in 2..8.
        rounding: ``"nearest"`` or ``"stochastic"``; generator: for stochastic.
        u: stochastic only: the uniforms, ``x``'s shape (:mod:`.rounding`); ``None`` draws
            them in ``x``'s own layout.

    Returns:
        New tensor of ``x``'s shape and dtype. The scaling by ``2**±shift`` is done as
        two multiplications by exact powers of two, so every element is the exact grid
        value rounded once to the compute dtype: it is exact except where the grid
        value is outside the dtype's range (fp32: ``±max`` with ``E = 127`` and
        ``w >= 26`` rounds to ``±inf``; grid values below ``2**-149`` round to fp32
        subnormals -- never the case for fp32 inputs with ``e = 8``).
    """
    qmax = float(2 ** (width - 1) - 1)
    e = shared_exponent(amax, exponent_bits)
    shift = (width - 2) - e  # x * 2**shift = x / s, with s = 2**(E - (w - 2))
    up_a, up_b = _exp2_halves(shift, x.dtype)  # up_a * up_b = 2**shift = 1 / s
    down_a = torch.reciprocal(up_a)  # exact: 1 / 2**j = 2**-j, |j| <= 78
    down_b = torch.reciprocal(up_b)
    # Scaling up (x / s): the block maximum maps into [2^(w-2), 2^(w-1)) unless E was
    # clamped; an overflow to inf (only possible after clamping E from above) is then
    # clamped to qmax, which is the right answer. Scaling down: |k| >= 1 and
    # down_a >= 2**-78 (shift <= 29 + 127), so k * down_a is normal and exact and only
    # the last product can round.
    y = x * up_a
    y.mul_(up_b)
    y = apply_rounding_(y, rounding, generator, u)
    y.clamp_(-qmax, qmax)
    y.mul_(down_a)
    y.mul_(down_b)
    return y


def bfp_quantize(
    x: Tensor,
    width: int,
    exponent_bits: int = 8,
    block_size: int = 16,
    dim: int = -1,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fake-quantize ``x`` to block floating point BFP(w, e, B) (DESIGN.md section 1).

    Blocks are ``B = block_size`` consecutive elements along ``dim`` (the reduction
    dimension of the GEMM that consumes ``x``); a tail shorter than ``B`` is its own
    block. Per block, with ``NaN`` excluded from the maximum:

    * ``E = clamp(floor(log2(max|x|)), -(2^(e-1)-1), 2^(e-1)-1)``; all-zero block:
      ``E = 0``; a block holding ``±inf`` has ``E = 2^(e-1)-1``;
    * ``s = 2^(E - (w-2))``;
    * ``q = clamp(round(x / s), -(2^(w-1)-1), 2^(w-1)-1) * s``.

    ``round`` is half-to-even (``"nearest"``) or stochastic (``"stochastic"``, see
    :mod:`.rounding`). NaN stays NaN in its own element; ``±inf`` becomes ``±max =
    ±(2^(w-1)-1) * s``; subnormal inputs work.

    Args:
        x: float32, bfloat16, float16 (or float64) tensor of any shape. Not modified.
        width: ``w``, bits per element including the sign, 2..32; 32 returns ``x``
            itself (the same object, unquantized -- not a copy).
        exponent_bits: ``e``, bits of the shared exponent, 2..8.
        block_size: ``B >= 1``.
        dim: the axis the blocks run along.
        rounding: ``"nearest"`` or ``"stochastic"``.
        generator: ``torch.Generator`` on ``x.device`` for stochastic rounding
            (``None``: torch's default). One key per call; element ``i`` of ``x``
            (row-major) rounds with ``u`` at index ``i`` (:mod:`.rounding`), so the draws
            do not depend on ``dim`` or ``block_size``.

    Returns:
        A new contiguous tensor (except for width 32) with ``x``'s shape, dtype and
        device, not attached to autograd (computed under ``torch.no_grad()`` on
        ``x.detach()``). fp32/bf16/fp16 inputs are computed in fp32 (fp64 in fp64) and
        the result is cast back: for bf16/fp16 it is the fp32 quantized value rounded
        to the input dtype -- exact whenever the grid value fits the input dtype's
        range, e.g. always for finite fp16 inputs; ``±max`` beyond the dtype's range
        (an ``inf`` input in fp16, or in bf16 with ``w >= 10``, or in fp32 with
        ``w >= 26``) comes back as ``±inf``.

    Raises:
        ValueError: for any argument outside the ranges above.
    """
    x = v.check_tensor(x)
    width, exponent_bits, block_size, dim = v.check_bfp(x, width, exponent_bits, block_size, dim)
    rounding = v.check_rounding(rounding)
    generator = v.check_generator(generator)
    if width == 32:
        return x
    if x.numel() == 0:
        return x.detach().clone()
    with torch.no_grad():
        xc = x.detach().to(_compute_dtype(x.dtype))
        if xc.dim() == 0:
            xc = xc.reshape(1)
        n = xc.shape[dim]
        nblocks = -(-n // block_size)
        pad = nblocks * block_size - n

        def blocked(t: Tensor) -> Tensor:  # [..., nblocks, B] along dim, zero-padded
            t = t.movedim(dim, -1)
            if pad:
                t = F.pad(t, (0, pad))
            return t.reshape(*t.shape[:-1], nblocks, block_size)

        xb = blocked(xc)
        u = None
        if rounding == "stochastic":  # drawn in x's layout, then blocked like x
            u = blocked(uniform_like(draw_key(generator, xc.device), xc.shape))
        amax = nan_free_abs(xb).amax(dim=-1, keepdim=True)
        q = pow2_block_quantize(xb, amax, width, exponent_bits, rounding, generator, u)
        q = q.reshape(*q.shape[:-2], nblocks * block_size)
        if pad:
            q = q[..., :n]
        q = q.movedim(-1, dim).reshape(x.shape)
        return q.to(x.dtype).contiguous()


@dataclass(frozen=True)
class BFP(WidthFormat):
    """Block floating point BFP(w, e, B): ``B`` elements share one ``e``-bit exponent.

    Each element holds a sign and ``w - 1`` magnitude bits ``k``; the block holds an
    exponent ``E`` in ``[-E_max, E_max]``, ``E_max = 2^(e-1) - 1``. Representable
    values of a block with exponent ``E``:

    .. math::
        q = k \\cdot 2^{E-(w-2)}, \\quad k \\in \\{-(2^{w-1}-1), \\dots, 2^{w-1}-1\\}

    so the largest magnitude over all blocks is ``(2^(w-1)-1) * 2^(E_max-w+2)``
    (just below ``2^(E_max+1)``) and the smallest nonzero one ``2^(-E_max-w+2)``;
    within a block the relative precision is ``w - 1`` bits at the block maximum.

    Rounding, with ``E = clamp(floor(log2 max_block|x|), -E_max, E_max)`` and
    ``s = 2^(E-(w-2))``:

    .. math::
        q(x) = \\mathrm{clamp}\\big(\\mathrm{round}(x/s), -(2^{w-1}-1), 2^{w-1}-1\\big)
               \\cdot s

    where round is half-to-even (``rounding="nearest"``, error ``<= s/2``) or
    stochastic (``floor(x/s) + [u < frac(x/s)]``, ``u ~ U[0,1)``, unbiased).
    ``width == 32`` is the identity. See :func:`bfp_quantize` for NaN/inf/dtypes.

    Args:
        width: ``w`` in 2..32 (bits per element including the sign).
        exponent_bits: ``e`` in 2..8 (shared exponent bits, not counted in ``w``).
        block_size: ``B >= 1``.
    """

    exponent_bits: int = 8
    block_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "exponent_bits", v.check_exponent_bits(self.exponent_bits))
        object.__setattr__(self, "block_size", v.check_block_size(self.block_size))

    @property
    def max_exponent(self) -> int:
        """``E_max = 2^(e-1) - 1``; the shared exponent lies in ``[-E_max, E_max]``."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def bits_per_element(self) -> float:
        """Storage cost: ``w + e / B`` bits per element."""
        return self.width + self.exponent_bits / self.block_size

    def quantize(
        self,
        x: Tensor,
        dim: int = -1,
        rounding: str = "nearest",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:func:`bfp_quantize` with this format's parameters, blocks along ``dim``."""
        return bfp_quantize(
            x,
            self.width,
            exponent_bits=self.exponent_bits,
            block_size=self.block_size,
            dim=dim,
            rounding=rounding,
            generator=generator,
        )

    def __str__(self) -> str:
        return f"BFP{self.width}(e={self.exponent_bits}, B={self.block_size})"
