"""Typed precision settings: the four quantization points of a DSQ GEMM and the format family.

A :class:`Precision` is one level ``[q0, q1, q2, q3]`` of bit widths (DESIGN.md §2):

* ``q0`` — forward GEMM operands,
* ``q1`` — what is stashed for the backward pass,
* ``q2`` — operands of the input-gradient GEMM,
* ``q3`` — gradient outputs written back (and ``g`` in the weight-gradient GEMM).

Widths count the sign bit; ``32`` (or the word ``fp32`` when parsing) leaves a point unquantized.
With format ``mx`` a point names an OCP MX format instead of a width (``mxint8``, ``mxfp8_e4m3``,
``mxfp8_e5m2``, ``mxfp6_e3m2``, ``mxfp6_e2m3``, ``mxfp4``; ``fp32``/``32`` = unquantized), e.g.
``Precision("mxfp4", "mxfp4", "mxfp4", "mxfp8_e5m2")``. MX points are ordered by element bits
(4 < 6 < 8 < 32; the two FP8 and the two FP6 variants, and MXINT8 with FP8, count as equal), which
is the order "levels never go down" and the logged ``dsq_bits`` / ``dsq_q*`` use
(:func:`point_bits`).
A :class:`QuantScheme` says *how* a width is realised (BFP / Fixed / Int / MX / none) and is shared
by every GEMM of a model. Both are immutable; one ``QuantScheme`` plus the schedule's current
``Precision`` is all a GEMM needs.

Every validation error is a :class:`DSQConfigError` whose message names the command-line flag and
the allowed values, so ``fairseq-train`` can report it before any training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from dsq_fairseq import quant as _reference  # bfp/fixed/int_quantize: the eager references
from dsq_fairseq.quant import MX, MX_FORMATS, fast, mx_quantize, native

FULL_PRECISION = 32
MIN_WIDTH = 2
FORMATS = ("bfp", "fixed", "int", "none", "mx")
MX_POINT_NAMES = (*MX_FORMATS, "fp32")
"""What a point of a level may say with ``--dsq-format mx``."""

Point = Union[int, str]
"""One quantization point: a width 2..32 (32 = unquantized) or an MX format name."""
ROUNDINGS = ("nearest", "stochastic")
INT_GRANULARITIES = ("tensor", "channel", "token")


class DSQConfigError(ValueError):
    """A user error in a ``--dsq-*`` option (reported without a traceback)."""


def point_bits(point: Point) -> int:
    """Bits per element of a point: the width itself, or an MX format's element bits."""
    return MX(point).element_bits if isinstance(point, str) else point


def is_full_precision(point: Point) -> bool:
    """True for a point left unquantized (width 32)."""
    return not isinstance(point, str) and point >= FULL_PRECISION


def _mx_allowed() -> str:
    return ", ".join(MX_POINT_NAMES)


def _parse_width(token: str, flag: str, format: Optional[str] = None) -> Point:
    """One point of a level: a width, ``fp32`` (= 32) or, unless ``format`` forbids it, an MX
    format name. ``format="mx"`` requires MX names (or ``fp32``/``32``)."""
    token = token.strip().lower()
    if token == "fp32":
        return FULL_PRECISION
    if token in MX_FORMATS:
        if format not in (None, "mx", "none"):
            raise DSQConfigError(
                f"{flag}: '{token}' is an MX format, which needs --dsq-format mx; with "
                f"--dsq-format {format} the points are widths {MIN_WIDTH}..{FULL_PRECISION} or "
                "'fp32'"
            )
        return token
    try:
        width = int(token)
    except ValueError:
        raise DSQConfigError(
            f"{flag}: '{token}' is not a bit width; allowed: integers "
            f"{MIN_WIDTH}..{FULL_PRECISION} or 'fp32'"
            + (f" (MX format names with --dsq-format mx: {_mx_allowed()})" if format != "mx"
               else f"; with --dsq-format mx each point is one of {_mx_allowed()}")
        ) from None
    if format == "mx" and width != FULL_PRECISION:
        raise DSQConfigError(
            f"{flag}: width {width} is not an MX format; with --dsq-format mx each point is one "
            f"of {_mx_allowed()}"
        )
    if not MIN_WIDTH <= width <= FULL_PRECISION:
        raise DSQConfigError(
            f"{flag}: width {width} is out of range; allowed: {MIN_WIDTH}..{FULL_PRECISION} "
            "(32 or 'fp32' = unquantized)"
        )
    return width


@dataclass(frozen=True)
class Precision:
    """One precision level ``q0, q1, q2, q3``: each a bit width in 2..32 (32 = unquantized) or an
    MX format name (:data:`MX_FORMATS`, for ``--dsq-format mx``)."""

    q0: Point
    q1: Point
    q2: Point
    q3: Point

    def __post_init__(self) -> None:
        for name in ("q0", "q1", "q2", "q3"):
            width = getattr(self, name)
            if isinstance(width, str):
                if width.strip().lower() not in MX_FORMATS:
                    raise DSQConfigError(
                        f"precision {name}={width!r}: allowed MX formats are "
                        f"{', '.join(MX_FORMATS)}"
                    )
                object.__setattr__(self, name, width.strip().lower())
            elif (
                not isinstance(width, int) or isinstance(width, bool)
                or not MIN_WIDTH <= width <= FULL_PRECISION
            ):
                raise DSQConfigError(
                    f"precision {name}={width!r}: allowed widths are {MIN_WIDTH}..{FULL_PRECISION}"
                    f" (or an MX format: {', '.join(MX_FORMATS)})"
                )

    @classmethod
    def parse(
        cls, text: str, flag: str = "--dsq-schedule", format: Optional[str] = None
    ) -> Precision:
        """Parse ``"16,4,4,16"`` (``fp32`` allowed for 32) or ``"mxfp4,mxfp4,mxfp4,fp32"``;
        errors name ``flag``. ``format`` (the ``--dsq-format``) restricts the points: ``mx``
        requires MX names, ``bfp``/``fixed``/``int`` forbid them, ``None`` accepts both."""
        tokens = [t for t in text.split(",")]
        if len(tokens) != 4 or any(not t.strip() for t in tokens):
            example = "'mxfp4,mxfp4,mxfp4,mxfp8_e5m2'" if format == "mx" else "'16,4,4,16'"
            raise DSQConfigError(
                f"{flag}: level '{text}' must have exactly 4 comma-separated widths q0,q1,q2,q3 "
                f"(e.g. {example})"
            )
        return cls(*(_parse_width(t, flag, format) for t in tokens))

    def as_list(self) -> List[Point]:
        return [self.q0, self.q1, self.q2, self.q3]

    @property
    def bits(self) -> List[int]:
        """Bits per element of q0..q3 (MX: element bits; 32 = unquantized): always numbers."""
        return [point_bits(p) for p in self.as_list()]

    @property
    def is_mx(self) -> bool:
        """True when some point names an MX format."""
        return any(isinstance(p, str) for p in self.as_list())

    def __str__(self) -> str:
        return ",".join(str(w) for w in self.as_list())


def parse_schedule(
    text: str, flag: str = "--dsq-schedule", format: Optional[str] = None
) -> List[Precision]:
    """Parse ``"2,2,2,16;16,4,4,16"`` into levels, lowest first.

    A level may not be lower than its predecessor at any point (levels never go down); MX points
    compare by element bits (:func:`point_bits`). ``format`` as in :meth:`Precision.parse`.
    """
    if text is None or not str(text).strip():
        raise DSQConfigError(f"{flag}: empty schedule; give levels like '2,2,2,16;16,4,4,16'")
    parts = str(text).strip().strip(";").split(";")
    levels = [Precision.parse(p, flag, format) for p in parts]
    for i in range(1, len(levels)):
        lo, hi = levels[i - 1].bits, levels[i].bits
        if any(h < lo_ for h, lo_ in zip(hi, lo)):
            raise DSQConfigError(
                f"{flag}: level {i + 1} ({levels[i]}) goes below level {i} ({levels[i - 1]}); "
                "levels must be listed lowest first and never go down in any of q0..q3"
            )
    return levels


@dataclass(frozen=True)
class QuantScheme:
    """How a bit width is realised at every quantization point of a model.

    ``format``: ``bfp`` (blocks of ``block_size`` along the consuming GEMM's reduction dim,
    ``exponent_bits`` shared exponent), ``fixed`` (one power-of-two scale per tensor), ``int``
    (linear symmetric, scale per ``int_granularity``), ``mx`` (OCP MX: each point names its MX
    format; blocks of 32 along the reduction dim, E8M0 scales; ``block_size`` and
    ``exponent_bits`` do not apply) or ``none`` (no quantization at all).
    ``int_granularity``: ``tensor`` — one scale per tensor everywhere; ``channel`` — weights get
    one scale per vector along the reduction dim (per output channel in the forward GEMM),
    activations/gradients one per tensor; ``token`` — as ``channel`` and activations/gradients
    also get one scale per vector along the reduction dim (per token in the forward GEMM).
    """

    format: str = "bfp"
    block_size: int = 16
    exponent_bits: int = 8
    rounding: str = "nearest"
    int_granularity: str = "tensor"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DSQConfigError(
                f"--dsq-format: unknown format '{self.format}'; allowed: {', '.join(FORMATS)}"
            )
        if self.rounding not in ROUNDINGS:
            raise DSQConfigError(
                f"--dsq-rounding: unknown rounding '{self.rounding}'; allowed: "
                f"{', '.join(ROUNDINGS)}"
            )
        if self.int_granularity not in INT_GRANULARITIES:
            raise DSQConfigError(
                f"--dsq-int-granularity: unknown granularity '{self.int_granularity}'; allowed: "
                f"{', '.join(INT_GRANULARITIES)}"
            )
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise DSQConfigError(
                f"--dsq-block-size: {self.block_size!r} is not allowed; it must be an integer >= 1"
            )
        if not isinstance(self.exponent_bits, int) or not 2 <= self.exponent_bits <= 8:
            raise DSQConfigError(
                f"--dsq-exponent-bits: {self.exponent_bits!r} is not allowed; allowed: 2..8"
            )

    @property
    def enabled(self) -> bool:
        return self.format != "none"

    def quantize(
        self,
        x: torch.Tensor,
        width: Point,
        dim: int = -1,
        is_weight: bool = False,
        generator: Optional[torch.Generator] = None,
        overwrite: bool = False,
    ) -> torch.Tensor:
        """Fake-quantize ``x`` to ``width`` bits (or the MX format ``width`` names), blocks/vectors
        along ``dim``; same shape/dtype.

        ``overwrite``: the caller owns ``x`` and drops it (a GEMM's fresh output), so the result
        may be written over ``x`` (BFP round-to-nearest on the native kernel:
        :func:`~dsq_fairseq.quant.fast.bfp_quantize_`); same values either way.

        ``width >= 32`` or format ``none`` returns ``x`` itself (no copy). BFP/Fixed/Int run the
        fused fast path (:mod:`dsq_fairseq.quant.fast`, bit-identical to the reference) for
        tensors of at least :func:`~dsq_fairseq.quant.fast.min_numel` elements after a warm-up
        (:func:`~dsq_fairseq.quant.fast.wanted`) unless ``DSQ_FAST=0``; the rest take the
        reference (short runs of tiny models never compile). BFP (either rounding) of CPU fp32
        tensors takes the native C kernel (:mod:`dsq_fairseq.quant.native`) at any size, where
        this CPU has it: nothing to compile.
        """
        if self.format == "none" or is_full_precision(width):
            return x
        if isinstance(width, str):
            return mx_quantize(x, width, dim=dim, rounding=self.rounding, generator=generator)
        if self.format == "mx":
            raise DSQConfigError(
                f"--dsq-schedule: width {width} is not an MX format; with --dsq-format mx each "
                f"point is one of {_mx_allowed()}"
            )
        if self.format == "bfp" and native.available(x):
            if overwrite and self.rounding == "nearest":
                return fast.bfp_quantize_(x, width, self.exponent_bits, self.block_size, dim)
            impl = fast  # its native C kernel: no compile, worth it at any size
        else:
            impl = fast if fast.wanted(x) else _reference
        if self.format == "bfp":
            return impl.bfp_quantize(
                x, width, exponent_bits=self.exponent_bits, block_size=self.block_size, dim=dim,
                rounding=self.rounding, generator=generator,
            )
        if self.format == "fixed":
            return impl.fixed_quantize(x, width, rounding=self.rounding, generator=generator)
        return impl.int_quantize(
            x, width, granularity=self.int_granularity_for(is_weight), dim=dim,
            rounding=self.rounding, generator=generator,
        )

    def int_granularity_for(self, is_weight: bool) -> str:
        """The ``int_quantize`` granularity an operand gets: ``channel`` applies to weights only
        (activations/gradients per tensor); ``token`` means one scale per vector for every
        operand (weights: per channel)."""
        granularity = self.int_granularity
        if granularity == "channel" and not is_weight:
            return "tensor"
        if granularity == "token" and is_weight:
            return "channel"
        return granularity

