"""Number formats for DSQ fake quantization (DESIGN.md section 1).

Every quantizer takes an fp32/bf16/fp16 (or fp64) tensor and returns a new tensor of
the same shape, dtype and device holding values of the format, detached from autograd;
``width=32`` returns the input object itself (unquantized).

* :func:`bfp_quantize` / :class:`BFP` -- block floating point BFP(w, e, B);
* :func:`fixed_quantize` / :class:`Fixed` -- dynamic fixed point (one power-of-two
  scale per tensor);
* :func:`int_quantize` / :class:`Int` -- symmetric linear integers, per tensor /
  channel / token;
* :mod:`.rounding` -- ``"nearest"`` (half to even) and ``"stochastic"`` rounding.
"""

from .bfp import BFP, bfp_quantize
from .fixed import Fixed, fixed_quantize
from .integer import Int, int_quantize
from .rounding import ROUNDING_MODES, round_nearest, round_stochastic

__all__ = [
    "BFP",
    "ROUNDING_MODES",
    "Fixed",
    "Int",
    "bfp_quantize",
    "fixed_quantize",
    "int_quantize",
    "round_nearest",
    "round_stochastic",
]
