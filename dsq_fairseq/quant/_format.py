"""What the format dataclasses (:class:`~.bfp.BFP`, :class:`~.fixed.Fixed`, :class:`~.integer.Int`)
share: a validated element width and what follows from it alone."""

from __future__ import annotations

from dataclasses import dataclass

from . import _validate as v


@dataclass(frozen=True)
class WidthFormat:
    """A format with ``width`` = ``w`` bits per element, sign included (2..32; 32 = identity)."""

    width: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", v.check_width(self.width))

    @property
    def is_identity(self) -> bool:
        """True for width 32 (leave unquantized)."""
        return self.width == 32

    @property
    def max_int(self) -> int:
        """``2^(w-1) - 1``, the largest element magnitude in units of the step ``s`` (BFP, Fixed)
        or of the scale ``S`` (Int)."""
        return 2 ** (self.width - 1) - 1
