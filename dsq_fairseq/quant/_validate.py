"""Argument checks shared by the quantizers and the format objects.

Every check raises ``ValueError`` whose message names the parameter, the allowed
values and what was given.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .rounding import ROUNDING_MODES

MIN_WIDTH = 2
MAX_WIDTH = 32
"""Width 32 means "leave unquantized" (identity)."""
MIN_EXPONENT_BITS = 2
MAX_EXPONENT_BITS = 8
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "token")
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
)


def _as_int(value: object) -> int | None:
    """``int(value)`` for an integral non-bool value (incl. numpy ints), else None."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


def check_width(width: object) -> int:
    w = _as_int(width)
    if w is None or not MIN_WIDTH <= w <= MAX_WIDTH:
        raise ValueError(
            f"width must be an int in {MIN_WIDTH}..{MAX_WIDTH} "
            f"(bits per element including the sign; 32 = unquantized), got {width!r}"
        )
    return w


def check_exponent_bits(exponent_bits: object) -> int:
    e = _as_int(exponent_bits)
    if e is None or not MIN_EXPONENT_BITS <= e <= MAX_EXPONENT_BITS:
        raise ValueError(
            f"exponent_bits must be an int in {MIN_EXPONENT_BITS}..{MAX_EXPONENT_BITS}, "
            f"got {exponent_bits!r}"
        )
    return e


def check_block_size(block_size: object) -> int:
    b = _as_int(block_size)
    if b is None or b < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    return b


def check_rounding(rounding: object) -> str:
    if not isinstance(rounding, str) or rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES!r}, got {rounding!r}")
    return rounding


def check_granularity(granularity: object) -> str:
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES!r}, got {granularity!r}")
    return granularity


def check_generator(generator: object) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    return generator


def check_tensor(x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"x.dtype must be one of ({names}), got {x.dtype}")
    return x


def check_dim(x: Tensor, dim: object) -> int:
    """Return ``dim`` normalised to ``0..ndim-1`` (a 0-d tensor accepts -1 and 0)."""
    ndim = max(x.dim(), 1)
    d = _as_int(dim)
    if d is None or not -ndim <= d < ndim:
        raise ValueError(
            f"dim must be an int in {-ndim}..{ndim - 1} for a tensor of shape "
            f"{tuple(x.shape)}, got {dim!r}"
        )
    return d % ndim


def check_bfp(x: Tensor, width: object, exponent_bits: object, block_size: object,
              dim: object) -> tuple[int, int, int, int]:
    """``(width, exponent_bits, block_size, dim)`` of a BFP quantization of ``x``, each
    checked as by its own check (in that order); ``dim`` made non-negative."""
    return (check_width(width), check_exponent_bits(exponent_bits), check_block_size(block_size),
            check_dim(x, dim))
