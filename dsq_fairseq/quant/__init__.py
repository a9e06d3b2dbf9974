"""Number formats for DSQ fake quantization (DESIGN.md section 1).

Every quantizer takes an fp32/bf16/fp16 (or fp64) tensor and returns a new tensor of
the same shape, dtype and device holding values of the format, detached from autograd;
``width=32`` returns the input object itself (unquantized).

* :func:`bfp_quantize` / :class:`BFP` -- block floating point BFP(w, e, B);
* :func:`fixed_quantize` / :class:`Fixed` -- dynamic fixed point (one power-of-two
  scale per tensor);
* :func:`int_quantize` / :class:`Int` -- symmetric linear integers, per tensor /
  channel / token;
* :func:`mx_quantize` / :class:`MX` -- OCP Microscaling v1.0 (MXINT8, MXFP8 E4M3/E5M2,
  MXFP6 E3M2/E2M3, MXFP4): blocks of 32 sharing an E8M0 scale; :func:`mx_encode` /
  :func:`mx_decode` give the bit-level codes;
* :mod:`.rounding` -- ``"nearest"`` (half to even) and ``"stochastic"`` rounding.
"""

from .bfp import BFP, bfp_quantize
from .fixed import Fixed, fixed_quantize
from .integer import Int, int_quantize
from .mx import MX, MX_FORMATS, mx_decode, mx_encode, mx_quantize
from .rounding import ROUNDING_MODES, round_nearest, round_stochastic

__all__ = [
    "BFP",
    "ROUNDING_MODES",
    "Fixed",
    "Int",
    "MX",
    "MX_FORMATS",
    "bfp_quantize",
    "fixed_quantize",
    "int_quantize",
    "mx_decode",
    "mx_encode",
    "mx_quantize",
    "round_nearest",
    "round_stochastic",
]
