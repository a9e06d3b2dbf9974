"""The coefficient table of the hardware cost model (DESIGN.md §4), as data, each with its source.

Units
-----
* **Arithmetic** is counted in *full-adder cells* ("units"): an ``a x b``-bit array multiplier
  is ``a * b`` cells, an ``n``-bit adder ``n`` cells. A 32x32-bit fixed-point multiply is
  therefore ``32 * 32 = 1024`` units, and the model reports arithmetic in *Fixed32-MAC
  equivalents* (units / 1024), so a GEMM of ``M`` MACs at Fixed(32) costs exactly ``M``.
* **DRAM traffic** is counted in bits read plus bits written.

Every entry below says where its value comes from. ``docs/cost_model.md`` restates all of them
next to the formulas that use them; the functions that apply them are in
:mod:`dsq_fairseq.cost.model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Coefficient:
    """One number of the cost model: its value, its unit and where it comes from."""

    name: str
    value: float
    unit: str
    source: str


_TABLE = (
    Coefficient(
        "reference_width", 32, "bits",
        "The paper reports every cost relative to 32-bit fixed point (its 1.00x row); "
        "DESIGN.md §4.",
    ),
    Coefficient(
        "unquantized_width", 32, "bits",
        "A point left unquantized (width 32 or format 'none') holds fp32 values: 32 bits per "
        "element in DRAM; its multiplier is costed as the 32-bit reference, so an all-fp32 run "
        "is the 1.00x baseline. DESIGN.md §2 ('32 ... means leave this point unquantized').",
    ),
    Coefficient(
        "multiply_units_per_bit_product", 1.0, "full-adder cells per (bit of a) x (bit of b)",
        "Array multiplier: an a x b multiplier has a*b partial-product cells (Weste & Harris, "
        "CMOS VLSI Design, ch. 11). Gives the paper's Fixed16 = (16*16)/(32*32) = 0.25x. "
        "Energy data agree: 8b/32b integer multiply 0.2 pJ / 3.1 pJ = 1/15.5 ~ (8/32)^2 "
        "(Horowitz, ISSCC 2014, 45 nm).",
    ),
    Coefficient(
        "accumulate_units", 0.0, "full-adder cells per MAC",
        "The accumulator add of a MAC is not counted for any format: the paper's Fixed16 = "
        "0.25x is the multiplier ratio alone (an accumulator term would make it > 0.25).",
    ),
    Coefficient(
        "bfp_exponent_add_units_per_bit", 1.0, "full-adder cells per exponent bit, per block",
        "BFP: one e-bit addition of the two shared exponents per block dot product of B "
        "products (MSFP / block floating point: mantissa products are integer, exponents are "
        "handled once per block; Darvish Rouhani et al., NeurIPS 2020). Adder cost = bits.",
    ),
    Coefficient(
        "bfp_block_align_units_per_bit", 1.0, "full-adder cells per partial-sum bit, per block",
        "BFP: the integer partial sum of a block (w_a + w_b + ceil(log2 B) bits) is aligned "
        "to and added into the floating-point accumulator once per block; costed as one adder "
        "of that width (same source as above). Fixed point needs no alignment (one scale per "
        "tensor).",
    ),
    Coefficient(
        "bfp_exponent_storage", 1.0, "shared-exponent bits stored per block (x e)",
        "BFP(w, e, B) stores w bits per element plus one e-bit exponent per block of B "
        "(DESIGN.md §1, §4: 'w bits per element + e/B'); blocks run along the dimension the "
        "quantizer blocks (dsq_fairseq/nn/functional.py), a shorter tail is its own block.",
    ),
    Coefficient(
        "fixed_scale_bits", 0.0, "bits per tensor",
        "Fixed(w) has one power-of-two scale per tensor (DESIGN.md §1); it lives in a register "
        "and is not counted (< 1e-5 of the tensor's bits for tensors of >= 1e5 elements), so "
        "Fixed16 is exactly 0.50x DRAM as in the paper.",
    ),
    Coefficient(
        "int_scale_bits", 32.0, "bits per scaled vector",
        "Int(w) per-channel / per-token scales are fp32 (dsq_fairseq/quant/integer.py: the scale "
        "max|x|/(2^(w-1)-1) is not a power of two); one per vector along the blocked dimension. "
        "A per-tensor scale is a register, not counted (as for Fixed).",
    ),
    Coefficient(
        "mx_scale_bits", 8.0, "bits per block of 32 (and exponent-add bits per block)",
        "OCP Microscaling Formats (MX) v1.0 spec: every block of k = 32 elements shares one "
        "E8M0 scale (8 bits). Costed in DRAM like BFP's shared exponent and in arithmetic as an "
        "8-bit exponent add plus a partial-sum alignment per block (BFP coefficients above).",
    ),
    Coefficient(
        "mx_element_exponent_add_units_per_bit", 1.0, "full-adder cells per exponent bit, per MAC",
        "MX FP elements (E4M3, E5M2, E3M2, E2M3, E2M1) carry their own exponent: every product "
        "adds the two element exponents (an adder of the wider exponent). MXINT8 has none. "
        "Significand multiplier: 1 sign + 1 implicit + m mantissa bits (OCP MX v1.0 element "
        "encodings).",
    ),
    Coefficient(
        "mx_product_align_units_per_bit", 1.0, "full-adder cells per product bit, per MAC",
        "MX FP elements: each product is shifted by its exponent into the block's integer "
        "accumulator before it is added (a shifter/adder of the product's width).",
    ),
    Coefficient(
        "int_rescale_units", 1024.0, "full-adder cells per GEMM output element",
        "Int: the integer dot product must be multiplied by the (non power-of-two) fp32 scale "
        "product once per output element; costed as one 32x32 multiply (Horowitz 2014: fp32 "
        "multiply 3.7 pJ ~ int32 multiply 3.1 pJ). Fixed/BFP rescale by shifting (free).",
    ),
)

COEFFICIENTS: Dict[str, Coefficient] = {c.name: c for c in _TABLE}


def value(name: str) -> float:
    """The value of coefficient ``name``."""
    return COEFFICIENTS[name].value


REFERENCE_WIDTH = int(value("reference_width"))
UNQUANTIZED_WIDTH = int(value("unquantized_width"))
#: Full-adder cells of one ``REFERENCE_WIDTH x REFERENCE_WIDTH`` multiply (the unit of 1 MAC).
REFERENCE_MAC_UNITS = REFERENCE_WIDTH * REFERENCE_WIDTH * value("multiply_units_per_bit_product")

__all__ = [
    "COEFFICIENTS",
    "Coefficient",
    "REFERENCE_MAC_UNITS",
    "REFERENCE_WIDTH",
    "UNQUANTIZED_WIDTH",
    "value",
]
