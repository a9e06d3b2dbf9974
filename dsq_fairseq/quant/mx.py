"""OCP Microscaling (MX) formats v1.0 -- DESIGN.md section 1.

An MX block is ``k = 32`` elements ``P_i`` of one element data type sharing one scale ``X``
stored as E8M0 (an 8-bit power-of-two exponent, bias 127, no sign, no zero): the block holds
the values ``X * P_i``. The concrete formats of the specification:

==============  ========  ====  ====  ====  ==========  ===========  ===================
name            element   bits  bias  emax  max normal  min subnorm  inf / NaN codes
==============  ========  ====  ====  ====  ==========  ===========  ===================
``mxfp8_e4m3``  FP8 E4M3  8     7     8     448         2^-9         NaN S.1111.111
``mxfp8_e5m2``  FP8 E5M2  8     15    15    57344       2^-16        inf S.11111.00, NaN
``mxfp6_e3m2``  FP6 E3M2  6     3     4     28          2^-4         none
``mxfp6_e2m3``  FP6 E2M3  6     1     2     7.5         2^-3         none
``mxfp4``       FP4 E2M1  4     1     2     6           2^-1         none
``mxint8``      INT8      8     --    0     127/64      2^-6         none
==============  ========  ====  ====  ====  ==========  ===========  ===================

(E4M3 has no infinity and its max normal is S.1111.110; E5M2's NaNs are S.11111.{01,10,11}.
``emax`` is the exponent of the largest normal element, ``emax_elem`` in the spec; INT8 is
two's complement with an implicit scale ``2^-6``: code ``c`` means ``c / 64``.)

Conversion of a block ``V_1..V_k`` (spec section 6.3), as implemented by :func:`mx_quantize`:

* ``X = 2^(floor(log2(max_i |V_i|)) - emax)``, the exponent clamped to the E8M0 range
  ``[-127, 127]`` (an all-zero block takes ``2^-127``; every element is 0 anyway);
* ``P_i = quantize(V_i / X)`` to the element type: round to the nearest representable value,
  ties to even mantissa (or stochastically), subnormal elements included; normal values beyond
  the element's max normal saturate to ``±max`` (the spec's conversion clamps them).

Special values (where the spec leaves a choice, the choice is stated):

* NaN: E4M3/E5M2 keep NaN in its own element (they have a NaN code) and the scale comes from the
  other elements; FP6/FP4/INT8 have no element NaN, so a block holding a NaN gets the E8M0 NaN
  scale (``0xFF``) and *every* element of that block reads back as NaN.
* ``±inf``: E5M2 keeps ``±inf`` in its own element (scale from the finite elements); the other
  types have no infinity: ``±inf`` counts as the largest finite value of the compute dtype, so the
  block scale saturates and the element becomes ``±max * X`` (as BFP does, DESIGN.md section 1).
* INT8 elements are produced in the symmetric range ``[-127, 127] / 64`` (as the microxcaling
  reference does); the code ``0x80`` (= -2) is a valid encoding that :meth:`MX.decode` reads,
  but conversion never produces it (it would need a tie-free value below ``-127.5 / 64``, i.e.
  beyond the block maximum that set the scale).

:func:`mx_encode` / :func:`mx_decode` give the real bit-level encoding (uint8 element codes and
E8M0 scale codes); :func:`mx_quantize` is the fake quantizer used by DSQ, and
``mx_decode(*mx_encode(x)) == mx_quantize(x)`` (blocks along the last dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validate as v
from .bfp import _compute_dtype, _exp2_halves, nan_free_abs
from .rounding import apply_rounding_

__all__ = [
    "MX",
    "MX_BLOCK_SIZE",
    "MX_FORMATS",
    "e8m0_decode",
    "e8m0_encode",
    "mx_decode",
    "mx_encode",
    "mx_quantize",
]

MX_BLOCK_SIZE = 32
"""``k``, the block size of every concrete MX format of the v1.0 spec."""
E8M0_BIAS = 127
E8M0_NAN = 0xFF
SCALE_EMIN, SCALE_EMAX = -127, 127


@dataclass(frozen=True)
class _Element:
    bits: int  # storage bits incl. sign
    ebits: int  # exponent bits (0: INT8)
    mbits: int  # explicit mantissa bits (INT8: 6 fraction bits)
    bias: int
    emax: int  # exponent of the largest normal value (emax_elem)
    max: float  # largest finite value
    has_inf: bool
    has_nan: bool

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (INT8: 0, it has a single binade)."""
        return 1 - self.bias if self.ebits else 0


_ELEMENTS: Dict[str, _Element] = {
    "mxint8": _Element(8, 0, 6, 0, 0, 127 / 64, False, False),
    "mxfp8_e4m3": _Element(8, 4, 3, 7, 8, 448.0, False, True),
    "mxfp8_e5m2": _Element(8, 5, 2, 15, 15, 57344.0, True, True),
    "mxfp6_e3m2": _Element(6, 3, 2, 3, 4, 28.0, False, False),
    "mxfp6_e2m3": _Element(6, 2, 3, 1, 2, 7.5, False, False),
    "mxfp4": _Element(4, 2, 1, 1, 2, 6.0, False, False),
}
MX_FORMATS: Tuple[str, ...] = tuple(_ELEMENTS)
"""The MX format names accepted everywhere (``fmt=``, ``--dsq-schedule`` with format ``mx``)."""
_ALIASES = {"mxfp4_e2m1": "mxfp4", "mxfp8": "mxfp8_e4m3", "mxfp6": "mxfp6_e3m2"}


def _check_fmt(fmt: object) -> str:
    name = fmt.strip().lower() if isinstance(fmt, str) else fmt
    name = _ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in _ELEMENTS:
        raise ValueError(f"fmt must be one of {MX_FORMATS!r}, got {fmt!r}")
    return name


def _pow2(k: Tensor) -> Tensor:
    """Exact ``2.0 ** k`` (float32) for an int32 tensor with ``|k| <= 126``."""
    return ((k + 127) << 23).view(torch.float32)


def _floor_log2(a: Tensor) -> Tensor:
    """``floor(log2(a))`` (int32) for positive finite ``a``, exact via ``frexp``; 0 -> -1."""
    _, p = torch.frexp(a)
    return (p - 1).to(torch.int32)


def _quantize_elements(
    y: Tensor, el: _Element, rounding: str, generator: torch.Generator | None
) -> Tensor:
    """Round ``y`` (already divided by the block scale) to element values, saturating.

    Grid: at private exponent ``p = clamp(floor(log2|y|), emin, emax)`` the step is
    ``2^(p - mbits)``; ``q = clamp(round(y / step) * step, -max, max)``. Rounding half to
    even on the integer ``y / step`` is round-half-to-even on the mantissa; a carry into the
    next binade lands on a value both grids hold. NaN stays NaN, ``±inf`` saturates (the
    caller restores E5M2's infinities).
    """
    p = _floor_log2(nan_free_abs(y)).clamp_(el.emin, el.emax)
    shift = el.mbits - p  # y * 2^shift is on the integer grid; |shift| <= 16
    up = _pow2(shift).to(y.dtype)
    down = _pow2(-shift).to(y.dtype)
    t = apply_rounding_(y * up, rounding, generator)
    q = t.mul_(down)
    return q.clamp_(-el.max, el.max)


def _to_blocks(x: Tensor, dim: int, block_size: int) -> Tuple[Tensor, Tuple[int, ...], int]:
    """``x`` (compute dtype) moved so ``dim`` is last, zero-padded to ``[..., nblocks, B]``."""
    xm = x.movedim(dim, -1)
    n = xm.shape[-1]
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    if pad:
        xm = F.pad(xm, (0, pad))
    return xm.reshape(*xm.shape[:-1], nblocks, block_size), tuple(xm.shape[:-1]), n


def _mx_core(
    xb: Tensor, el: _Element, rounding: str, generator: torch.Generator | None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Blocks ``[..., nblocks, B]`` -> (element values, scale exponents, block-is-NaN).

    Element values are the ``P_i`` (finite ones within ``±max``; E4M3/E5M2 NaN and E5M2 inf kept),
    scale exponents the int32 ``log2 X`` of shape ``[..., nblocks, 1]``, block-is-NaN a bool of
    the same shape (True where the E8M0 scale is NaN: FP6/FP4/INT8 blocks holding a NaN).
    """
    a = xb.abs()
    if el.has_inf:
        a = torch.where(torch.isinf(a), 0.0, a)  # E5M2 keeps inf in its element
    amax = torch.nan_to_num_(a, nan=0.0).amax(dim=-1, keepdim=True)
    s = (_floor_log2(amax) - el.emax).clamp_(SCALE_EMIN, SCALE_EMAX)
    s = torch.where(amax == 0, SCALE_EMIN, s).to(torch.int32)
    down_a, down_b = _exp2_halves(-s, xb.dtype)  # down_a * down_b = 1 / X
    y = xb * down_a
    y.mul_(down_b)
    q = _quantize_elements(y, el, rounding, generator)
    if el.has_inf:
        q = torch.where(torch.isinf(y), y, q)
    if el.has_nan:
        block_nan = torch.zeros_like(amax, dtype=torch.bool)
    else:
        block_nan = torch.isnan(xb).any(dim=-1, keepdim=True)
    return q, s, block_nan


def _prepare(x: Tensor, fmt: object, dim: int, rounding: str, generator, block_size: int):
    x = v.check_tensor(x)
    name = _check_fmt(fmt)
    dim = v.check_dim(x, dim)
    rounding = v.check_rounding(rounding)
    generator = v.check_generator(generator)
    block_size = v.check_block_size(block_size)
    return x, _ELEMENTS[name], dim, rounding, generator, block_size


def mx_quantize(
    x: Tensor,
    fmt: str,
    dim: int = -1,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    block_size: int = MX_BLOCK_SIZE,
) -> Tensor:
    """Fake-quantize ``x`` to the MX format ``fmt`` (blocks of 32 along ``dim``).

    Per block (a tail shorter than the block size is its own block), with ``emax`` the element
    type's largest normal exponent: ``X = 2^clamp(floor(log2 max|V|) - emax, -127, 127)`` and
    ``q_i = X * clamp(round_elem(V_i / X), -max, max)`` -- see the module docstring for the
    element grids, NaN and inf.

    Args:
        x: float32, bfloat16, float16 (or float64) tensor of any shape. Not modified.
        fmt: one of :data:`MX_FORMATS` (``mxint8``, ``mxfp8_e4m3``, ``mxfp8_e5m2``,
            ``mxfp6_e3m2``, ``mxfp6_e2m3``, ``mxfp4``).
        dim: the axis the blocks run along (the reduction dimension of the consuming GEMM).
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (see :mod:`.rounding`).
        generator: ``torch.Generator`` on ``x.device`` for stochastic rounding.
            One key per call (:mod:`.rounding`); ``u`` is indexed by the row-major position
            in the zero-padded ``[..., nblocks, 32]`` block layout along ``dim``.
        block_size: 32 in every concrete MX format; other values are accepted for experiments.

    Returns:
        A new contiguous tensor with ``x``'s shape, dtype and device, detached from autograd.
        fp32/bf16/fp16 inputs are computed in fp32 (fp64 in fp64); every fp32 result is exact
        (``X * P_i`` has at most 4 significant bits and lies within ``[2^-143, 2^128)``); for
        bf16/fp16 the result is that value rounded to the input dtype.

    Raises:
        ValueError: for any argument outside the ranges above.
    """
    x, el, dim, rounding, generator, block_size = _prepare(
        x, fmt, dim, rounding, generator, block_size
    )
    if x.numel() == 0:
        return x.detach().clone()
    with torch.no_grad():
        xc = x.detach().to(_compute_dtype(x.dtype))
        if xc.dim() == 0:
            xc = xc.reshape(1)
        xb, lead, n = _to_blocks(xc, dim, block_size)
        q, s, block_nan = _mx_core(xb, el, rounding, generator)
        up_a, up_b = _exp2_halves(s, q.dtype)
        q.mul_(up_a).mul_(up_b)
        q = torch.where(block_nan, float("nan"), q)
        q = q.reshape(*lead, -1)[..., :n]
        q = q.movedim(-1, dim).reshape(x.shape)
        return q.to(x.dtype).contiguous()


# ------------------------------------------------------------------------------ bit encodings


def e8m0_encode(exponent: Tensor) -> Tensor:
    """E8M0 codes (uint8) of scale exponents ``log2 X`` in ``[-127, 127]``: ``code = e + 127``."""
    e = exponent.to(torch.int32)
    if bool(((e < SCALE_EMIN) | (e > SCALE_EMAX)).any()):
        raise ValueError("E8M0 exponents must lie in -127..127")
    return (e + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(codes: Tensor) -> Tensor:
    """Scale values (float32) of E8M0 codes: ``2^(code - 127)``; ``0xFF`` is NaN."""
    c = codes.to(torch.int32)
    x = torch.ldexp(torch.ones(c.shape, dtype=torch.float64, device=c.device), c - E8M0_BIAS)
    x = torch.where(c == E8M0_NAN, float("nan"), x)
    return x.to(torch.float32)


def mx_encode(
    x: Tensor,
    fmt: str,
    dim: int = -1,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    block_size: int = MX_BLOCK_SIZE,
) -> Tuple[Tensor, Tensor]:
    """The bit-level MX encoding of ``x``: ``(element codes, E8M0 scale codes)``.

    ``dim`` is moved last and zero-padded to whole blocks: element codes are uint8 of shape
    ``[..., nblocks, block_size]`` (the low ``bits`` bits used), scale codes uint8 of shape
    ``[..., nblocks]``. Same conversion (and random draws) as :func:`mx_quantize`.
    """
    x, el, dim, rounding, generator, block_size = _prepare(
        x, fmt, dim, rounding, generator, block_size
    )
    with torch.no_grad():
        xc = x.detach().to(_compute_dtype(x.dtype))
        if xc.dim() == 0:
            xc = xc.reshape(1)
        xb, _, _ = _to_blocks(xc, dim, block_size)
        q, s, block_nan = _mx_core(xb, el, rounding, generator)
        scales = torch.where(block_nan, E8M0_NAN, s + E8M0_BIAS).to(torch.uint8).squeeze(-1)
        q = torch.where(block_nan.expand_as(q), 0.0, q)
        return MX(_name_of(el)).encode(q), scales


def mx_decode(codes: Tensor, scales: Tensor, fmt: str) -> Tensor:
    """float32 values ``X * P_i`` of element codes ``[..., nblocks, B]`` and scale codes
    ``[..., nblocks]`` (a NaN scale makes its whole block NaN)."""
    return MX(fmt).decode(codes) * e8m0_decode(scales).unsqueeze(-1)


def _name_of(el: _Element) -> str:
    return next(name for name, e in _ELEMENTS.items() if e is el)


# ------------------------------------------------------------------------------ value object


@dataclass(frozen=True)
class MX:
    """An OCP MX v1.0 format: blocks of ``block_size`` (32) elements of type ``fmt`` sharing
    one E8M0 scale ``X = 2^e``, ``e`` in ``[-127, 127]``.

    Element values of the floating-point types (``ebits`` exponent bits, ``m`` mantissa bits,
    exponent field ``E``, mantissa field ``M``, bias ``b``):

    .. math::
        P = (-1)^S \\cdot 2^{E-b} (1 + M/2^m) \\ (E > 0), \\qquad
        P = (-1)^S \\cdot 2^{1-b} (M/2^m) \\ (E = 0, subnormal)

    minus the special codes (E4M3: ``S.1111.111`` NaN; E5M2: ``S.11111.00`` inf, other
    ``S.11111.xx`` NaN); INT8: ``P = c / 64`` for the two's-complement byte ``c``.

    Conversion (``q = X P``, ``P = clamp(round(V / X), -max, max)`` on the element grid,
    ``X = 2^clamp(floor(log2 max|V|) - emax, -127, 127)``) keeps the block maximum in the top
    binade ``[2^emax, 2^(emax+1))`` of the element type before saturation; the relative error
    of a nearest-rounded normal element is at most ``2^-(m+1)``. See :func:`mx_quantize`.

    Args:
        fmt: one of :data:`MX_FORMATS` (aliases: ``mxfp4_e2m1``, ``mxfp8`` = E4M3,
            ``mxfp6`` = E3M2), case-insensitive; stored canonical.
        block_size: ``k``, 32 in the spec.
    """

    fmt: str
    block_size: int = MX_BLOCK_SIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", _check_fmt(self.fmt))
        object.__setattr__(self, "block_size", v.check_block_size(self.block_size))

    @property
    def _el(self) -> _Element:
        return _ELEMENTS[self.fmt]

    @property
    def element_bits(self) -> int:
        """Bits of one element code (4, 6 or 8)."""
        return self._el.bits

    @property
    def exponent_bits(self) -> int:
        """Element exponent bits (0 for INT8)."""
        return self._el.ebits

    @property
    def mantissa_bits(self) -> int:
        """Explicit element mantissa bits (INT8: 6 fraction bits)."""
        return self._el.mbits

    @property
    def emax(self) -> int:
        """``emax_elem``: exponent of the largest normal element value."""
        return self._el.emax

    @property
    def max_normal(self) -> float:
        """Largest finite element value (448, 57344, 28, 7.5, 6, 127/64)."""
        return self._el.max

    @property
    def min_normal(self) -> float:
        """Smallest positive normal element value (INT8: 1/64, all its values are "normal")."""
        el = self._el
        return 2.0 ** (el.emin - el.mbits) if not el.ebits else 2.0 ** el.emin

    @property
    def min_subnormal(self) -> float:
        """Smallest positive element value ``2^(emin - m)``."""
        el = self._el
        return 2.0 ** (el.emin - el.mbits)

    @property
    def bits_per_element(self) -> float:
        """Storage cost: element bits + 8 / k (the E8M0 scale)."""
        return self.element_bits + 8 / self.block_size

    def quantize(
        self,
        x: Tensor,
        dim: int = -1,
        rounding: str = "nearest",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:func:`mx_quantize` with this format, blocks along ``dim``."""
        return mx_quantize(x, self.fmt, dim, rounding, generator, self.block_size)

    # ---------------------------------------------------------------- element codes

    def code_values(self) -> Tensor:
        """float32 value of every element code ``0 .. 2^bits - 1`` (NaN / ±inf where special)."""
        return self.decode(torch.arange(2**self.element_bits, dtype=torch.int32))

    def decode(self, codes: Tensor) -> Tensor:
        """float32 element values of integer codes (the low ``bits`` bits of each)."""
        el = self._el
        c = codes.to(torch.int32) & (2**el.bits - 1)
        if not el.ebits:  # two's complement byte / 64
            return torch.where(c >= 128, c - 256, c).to(torch.float32) / 64.0
        sign = torch.where((c >> (el.bits - 1)) == 1, -1.0, 1.0).to(torch.float64)
        e = (c >> el.mbits) & (2**el.ebits - 1)
        m = (c & (2**el.mbits - 1)).to(torch.float64)
        frac = torch.where(e == 0, m, m + 2**el.mbits) / 2**el.mbits
        mag = torch.ldexp(frac, torch.where(e == 0, el.emin, e - el.bias))
        top = e == 2**el.ebits - 1
        if el.has_inf:  # E5M2: exponent all ones is inf (M = 0) or NaN
            mag = torch.where(top, torch.where(m == 0, math.inf, math.nan), mag)
        elif el.has_nan:  # E4M3: only S.1111.111 is NaN
            mag = torch.where(top & (m == 2**el.mbits - 1), math.nan, mag)
        return (sign * mag).to(torch.float32)

    def encode(self, values: Tensor) -> Tensor:
        """uint8 codes of element values (each must be representable, e.g. from conversion).

        ``-0.0`` keeps its sign bit; NaN takes ``S.1111.111`` (E4M3) / ``S.11111.11`` (E5M2);
        ``±inf`` (E5M2) ``S.11111.00``. Raises ``ValueError`` for a value off the grid.
        """
        el = self._el
        val = values.to(torch.float64)
        if not el.ebits:
            k = val * 64
            if bool((k != torch.round(k)).any() | (k.abs() > 128).any() | (k == 128).any()):
                raise ValueError(f"{self.fmt}: values off the INT8 grid k/64, -128 <= k <= 127")
            return k.to(torch.int32).to(torch.uint8)
        half = 2 ** (el.bits - 1)
        table = self.code_values()[:half].to(torch.float64)  # magnitudes, increasing
        finite = torch.isfinite(table)
        mags = table[finite]
        a = val.abs()
        idx = torch.searchsorted(mags, torch.nan_to_num(a, nan=0.0, posinf=0.0))
        idx = idx.clamp_(max=mags.numel() - 1)
        ok = (mags[idx] == a) | ~torch.isfinite(a)
        if not bool(ok.all()):
            raise ValueError(f"{self.fmt}: values off the element grid")
        code = idx.to(torch.int32)
        if el.has_nan:
            code = torch.where(torch.isnan(a), half - 1, code)
        if el.has_inf:
            code = torch.where(torch.isinf(a), (2**el.ebits - 1) << el.mbits, code)
        sign = torch.signbit(val) & ~torch.isnan(val)
        return (code | torch.where(sign, half, 0)).to(torch.uint8)

    def __str__(self) -> str:
        return self.fmt.upper() if self.block_size == MX_BLOCK_SIZE else (
            f"{self.fmt.upper()}(k={self.block_size})"
        )
