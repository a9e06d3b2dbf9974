"""Typed precision settings: the four quantization points of a DSQ GEMM and the format family.

A :class:`Precision` is one level ``[q0, q1, q2, q3]`` of bit widths (DESIGN.md §2):

* ``q0`` — forward GEMM operands,
* ``q1`` — what is stashed for the backward pass,
* ``q2`` — operands of the input-gradient GEMM,
* ``q3`` — gradient outputs written back (and ``g`` in the weight-gradient GEMM).

Widths count the sign bit; ``32`` (or the word ``fp32`` when parsing) leaves a point unquantized.
A :class:`QuantScheme` says *how* a width is realised (BFP / Fixed / Int / none) and is shared by
every GEMM of a model. Both are immutable; one ``QuantScheme`` plus the schedule's current
``Precision`` is all a GEMM needs.

Every validation error is a :class:`DSQConfigError` whose message names the command-line flag and
the allowed values, so ``fairseq-train`` can report it before any training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from dsq_fairseq.quant import bfp_quantize, fixed_quantize, int_quantize

FULL_PRECISION = 32
MIN_WIDTH = 2
FORMATS = ("bfp", "fixed", "int", "none")
ROUNDINGS = ("nearest", "stochastic")
INT_GRANULARITIES = ("tensor", "channel", "token")


class DSQConfigError(ValueError):
    """A user error in a ``--dsq-*`` option (reported without a traceback)."""


def _parse_width(token: str, flag: str) -> int:
    token = token.strip().lower()
    if token == "fp32":
        return FULL_PRECISION
    try:
        width = int(token)
    except ValueError:
        raise DSQConfigError(
            f"{flag}: '{token}' is not a bit width; allowed: integers "
            f"{MIN_WIDTH}..{FULL_PRECISION} or 'fp32'"
        ) from None
    if not MIN_WIDTH <= width <= FULL_PRECISION:
        raise DSQConfigError(
            f"{flag}: width {width} is out of range; allowed: {MIN_WIDTH}..{FULL_PRECISION} "
            "(32 or 'fp32' = unquantized)"
        )
    return width


@dataclass(frozen=True)
class Precision:
    """One precision level: bit widths ``q0, q1, q2, q3`` (each in 2..32, 32 = unquantized)."""

    q0: int
    q1: int
    q2: int
    q3: int

    def __post_init__(self) -> None:
        for name in ("q0", "q1", "q2", "q3"):
            width = getattr(self, name)
            if not isinstance(width, int) or not MIN_WIDTH <= width <= FULL_PRECISION:
                raise DSQConfigError(
                    f"precision {name}={width!r}: allowed widths are {MIN_WIDTH}..{FULL_PRECISION}"
                )

    @classmethod
    def parse(cls, text: str, flag: str = "--dsq-schedule") -> Precision:
        """Parse ``"16,4,4,16"`` (``fp32`` allowed for 32); errors name ``flag``."""
        tokens = [t for t in text.split(",")]
        if len(tokens) != 4 or any(not t.strip() for t in tokens):
            raise DSQConfigError(
                f"{flag}: level '{text}' must have exactly 4 comma-separated widths q0,q1,q2,q3 "
                "(e.g. '16,4,4,16')"
            )
        return cls(*(_parse_width(t, flag) for t in tokens))

    def as_list(self) -> List[int]:
        return [self.q0, self.q1, self.q2, self.q3]

    def __str__(self) -> str:
        return ",".join(str(w) for w in self.as_list())


def parse_schedule(text: str, flag: str = "--dsq-schedule") -> List[Precision]:
    """Parse ``"2,2,2,16;16,4,4,16"`` into levels, lowest first.

    A level may not be lower than its predecessor at any point (levels never go down).
    """
    if text is None or not str(text).strip():
        raise DSQConfigError(f"{flag}: empty schedule; give levels like '2,2,2,16;16,4,4,16'")
    parts = str(text).strip().strip(";").split(";")
    levels = [Precision.parse(p, flag) for p in parts]
    for i in range(1, len(levels)):
        lo, hi = levels[i - 1].as_list(), levels[i].as_list()
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
    (linear symmetric, scale per ``int_granularity``) or ``none`` (no quantization at all).
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
        width: int,
        dim: int = -1,
        is_weight: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Fake-quantize ``x`` to ``width`` bits, blocks/vectors along ``dim``; same shape/dtype.

        ``width >= 32`` or format ``none`` returns ``x`` itself (no copy).
        """
        if width >= FULL_PRECISION or self.format == "none":
            return x
        if self.format == "bfp":
            return bfp_quantize(
                x, width, exponent_bits=self.exponent_bits, block_size=self.block_size, dim=dim,
                rounding=self.rounding, generator=generator,
            )
        if self.format == "fixed":
            return fixed_quantize(x, width, rounding=self.rounding, generator=generator)
        granularity = self.int_granularity
        if granularity == "channel" and not is_weight:
            granularity = "tensor"
        elif granularity == "token" and is_weight:
            granularity = "channel"
        return int_quantize(
            x, width, granularity=granularity, dim=dim, rounding=self.rounding, generator=generator
        )

