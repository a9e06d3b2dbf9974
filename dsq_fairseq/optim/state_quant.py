"""Storage formats for Adam's moments: real integer codes plus per-block scales.

A moment tensor is flattened to ``n`` elements and cut into blocks of ``B`` consecutive elements
(the tail is its own block; format ``fixed``: one block for the whole tensor). Each block stores
``b``-bit integer codes ``k`` (in an ``int8`` / ``uint8`` tensor, one byte per element) and one
scale. Two ranges:

* **signed** (the first moment ``m``): ``k in [-(2^(b-1)-1), 2^(b-1)-1]``, ``int8`` codes;
* **unsigned** (``u = sqrt(v)``, the square root of the second moment, which is never
  negative): ``k in [0, 2^b - 1]``, ``uint8`` codes -- the sign bit would be wasted. The square
  root halves the dynamic range a block must cover (``v`` spans the *square* of the gradient
  range) and is what Adam divides by anyway. A positive ``u`` never gets code 0: it is raised to
  ``k = 1``, so an element that has seen a gradient never has its denominator
  ``sqrt(v) + eps`` collapse to ``eps`` (the ``m / eps`` blow-up of linear 8-bit moments).

Scales, with ``amax`` the block's largest magnitude and ``kmax`` the largest code:

* ``int``: ``S = amax / kmax`` stored as fp32, value ``k S`` (linear, Chitsaz et al. / 8-bit
  Adam style absmax blocks); ``k = round(x / S)``, error ``<= S / 2`` (``<= S`` for a positive
  ``u < S / 2`` raised to one step);
* ``bfp`` / ``fixed``: a shared exponent ``E = floor(log2 amax)`` stored as ``int8`` (clamped to
  ``[-127, 127]``), step ``s = 2^(E-(b-2))`` signed / ``2^(E-(b-1))`` unsigned (the block
  maximum maps into the top binade of the codes), value ``k s``; error ``<= s / 2``, ``<= s`` at
  the clamped top code.

Rounding is round-half-to-even, so quantization is a pure function of the values: a run resumed
from a checkpoint requantizes exactly as the uninterrupted run does. ``none`` keeps fp32 tensors
(fairseq's Adam, for comparison).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dsq_fairseq.precision import DSQConfigError
from dsq_fairseq.quant.bfp import _exp2_halves, nan_free_abs, shared_exponent

STATE_FORMATS = ("int", "bfp", "fixed", "none")
MIN_STATE_BITS, MAX_STATE_BITS = 2, 8


def _blocks(flat: Tensor, block: int) -> Tensor:
    """1-D ``flat`` zero-padded to whole blocks, as ``[nblocks >= 1, block]``."""
    nblocks = max(-(-flat.numel() // block), 1)
    return F.pad(flat, (0, nblocks * block - flat.numel())).view(nblocks, block)


@dataclass(frozen=True)
class StateQuantizer:
    """How each Adam moment is stored (see the module docstring for the formulas).

    Args:
        format: ``int`` (fp32 absmax scale per block), ``bfp`` (int8 shared exponent per block),
            ``fixed`` (one shared exponent per tensor) or ``none`` (fp32 moments).
        bits: ``b`` in 2..8 (codes are stored one per byte).
        block_size: ``B >= 1`` elements per block along the flattened parameter (not used by
            ``fixed`` / ``none``).
    """

    format: str = "int"
    bits: int = 8
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.format not in STATE_FORMATS:
            raise DSQConfigError(
                f"--dsq-adam-state-format: unknown format '{self.format}'; allowed: "
                f"{', '.join(STATE_FORMATS)}"
            )
        bits = self.bits
        if (not isinstance(bits, numbers.Integral) or isinstance(bits, bool)
                or not MIN_STATE_BITS <= bits <= MAX_STATE_BITS):
            raise DSQConfigError(
                f"--dsq-adam-state-bits: {bits!r} is not allowed; allowed: "
                f"{MIN_STATE_BITS}..{MAX_STATE_BITS} (codes are stored one per byte)"
            )
        block = self.block_size
        if not isinstance(block, numbers.Integral) or isinstance(block, bool) or block < 1:
            raise DSQConfigError(
                f"--dsq-adam-block-size: {block!r} is not allowed; it must be an integer >= 1"
            )
        object.__setattr__(self, "bits", int(bits))
        object.__setattr__(self, "block_size", int(block))

    @property
    def enabled(self) -> bool:
        return self.format != "none"

    def block_for(self, numel: int) -> int:
        """The block size used for a tensor of ``numel`` elements (``fixed``: all of it)."""
        return max(numel, 1) if self.format == "fixed" else self.block_size

    def bytes_per_element(self) -> float:
        """Bytes one moment element takes: 1 code byte + the block scale's share (none: 4)."""
        if not self.enabled:
            return 4.0
        if self.format == "fixed":
            return 1.0
        return 1.0 + (4.0 if self.format == "int" else 1.0) / self.block_size

    def encode(self, x: Tensor, signed: bool) -> Dict[str, Tensor]:
        """``{"codes": int8/uint8 [n], "scale": fp32 [nblocks]}`` (int) or ``{"codes", "exp":
        int8 [nblocks]}`` (bfp/fixed) of the finite fp32 tensor ``x`` (any shape)."""
        if not self.enabled:
            raise ValueError("format 'none' stores fp32 moments, nothing to encode")
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        xb = _blocks(flat, self.block_for(n))
        amax = nan_free_abs(xb).amax(dim=1, keepdim=True)
        kmax = 2 ** (self.bits - 1) - 1 if signed else 2**self.bits - 1
        out: Dict[str, Tensor] = {}
        if self.format == "int":
            scale = amax / kmax
            k = torch.round(xb / torch.where(scale == 0, 1.0, scale))
            out["scale"] = scale.view(-1)
        else:
            e = shared_exponent(amax, 8)
            shift = ((self.bits - 2) if signed else (self.bits - 1)) - e
            up_a, up_b = _exp2_halves(shift, torch.float32)
            k = torch.round(xb * up_a * up_b)
            out["exp"] = e.view(-1).to(torch.int8)
        k.clamp_(-kmax if signed else 0, kmax)
        if not signed:  # a positive sqrt(v) never collapses to 0
            k = torch.where((k == 0) & (xb > 0), 1.0, k)
        out["codes"] = k.view(-1)[:n].to(torch.int8 if signed else torch.uint8)
        return out

    @staticmethod
    def decode(
        codes: Tensor,
        bits: int,
        block: int,
        signed: bool,
        scale: Optional[Tensor] = None,
        exp: Optional[Tensor] = None,
    ) -> Tensor:
        """fp32 values (flat, ``codes.numel()`` long) of codes with the layout they were stored
        with: ``bits``, ``block`` and exactly one of ``scale`` (int) / ``exp`` (bfp/fixed)."""
        n = codes.numel()
        k = _blocks(codes.reshape(-1).float(), block)
        if scale is not None:
            y = k * scale.float().view(-1, 1)
        else:
            shift = exp.to(torch.int32).view(-1, 1) - ((bits - 2) if signed else (bits - 1))
            down_a, down_b = _exp2_halves(shift, torch.float32)
            y = k * down_a * down_b
        return y.view(-1)[:n]

    def error_bound(self, x: Tensor, signed: bool) -> Tensor:
        """Per-element bound on ``|decode(encode(x)) - x|`` (one step; half a step where no
        clamping or raising to code 1 applies) -- for tests and documentation."""
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        xb = _blocks(flat, self.block_for(n))
        amax = xb.abs().amax(dim=1, keepdim=True)
        if self.format == "int":
            step = amax / (2 ** (self.bits - 1) - 1 if signed else 2**self.bits - 1)
        else:
            e = shared_exponent(amax, 8).float()
            step = torch.pow(2.0, e - ((self.bits - 2) if signed else (self.bits - 1)))
        return step.expand_as(xb).reshape(-1)[:n] * (1 + 1e-6)

    def __str__(self) -> str:
        if not self.enabled:
            return "fp32"
        where = "per tensor" if self.format == "fixed" else f"blocks of {self.block_size}"
        return f"{self.format}{self.bits} ({where})"


def tensor_bytes(obj) -> int:
    """Sum of ``nbytes`` of every tensor in a (nested) dict / list / tuple, e.g. an optimizer's
    ``state`` or a checkpoint's ``last_optimizer_state``."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def fp32_adam_bytes(num_params: int) -> int:
    """What fairseq's ``adam`` keeps for ``num_params`` elements: two fp32 moments."""
    return 8 * num_params


__all__ = [
    "MAX_STATE_BITS",
    "MIN_STATE_BITS",
    "STATE_FORMATS",
    "StateQuantizer",
    "fp32_adam_bytes",
    "tensor_bytes",
]
