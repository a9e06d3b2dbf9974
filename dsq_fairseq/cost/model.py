"""The hardware cost model (DESIGN.md §4): pure functions of GEMM shapes, widths and format.

One DSQ GEMM ``C = A @ B`` (``batch x [m, k] @ [k, n]``; for a linear ``A = x``, ``B = W^T``)
costs, in a training step (DESIGN.md §2 for where q0..q3 sit)::

    sub-GEMM   computes                   shape (batch x m' x k' x n')   operand widths
    forward    C  = A @ B                 m  x k x n                     q0 x q0
    grad_a     dA = dC @ B~^T             m  x n x k                     q2 x q2
    grad_b     dB = A~^T @ dC             k  x m x n                     linear: q3 x q1
                                                                         matmul: q2 x q2

(for a linear ``grad_a`` is the input gradient ``dx`` and ``grad_b`` the weight gradient
``dW = Q3(g)^T @ x~``). An inference record (``training=False``) costs only ``forward``.

**Arithmetic** of a sub-GEMM with ``M = batch*m'*k'*n'`` MACs, in Fixed32-MAC equivalents::

    M * wa * wb / 32^2                                    (all formats)
    + batch*m'*n'*ceil(k'/B) * (e + wa + wb + ceil(log2 B)) / 32^2     (BFP: per block)
    + batch*m'*n' * 1024 / 32^2                           (Int: fp32 rescale per output)
    + M * (e_el + wa + wb) / 32^2                         (MX FP elements: per product)
    + batch*m'*n'*ceil(k'/32) * (8 + wa + wb + 5) / 32^2  (MX: per block of 32)

where ``wa, wb`` are the operand widths (32 for an unquantized operand; for an MX point its
element's significand, :func:`multiplier_width`).

**DRAM traffic** is the list :func:`dram_transfers` (every GEMM reads its two operands and
writes its result; the forward pass also writes the two stashes); a tensor of ``rows`` vectors
of ``length`` elements at width ``w`` takes :func:`tensor_bits`: ``w`` bits per element (32 if
unquantized) plus BFP's ``e`` bits per block of ``B`` along ``length`` or Int's 32-bit scale per
vector (per-channel / per-token granularity).

Everything is relative to the same shapes at :data:`FIXED32` (the paper's 1.00x) and also
reported against :data:`FIXED16`. Coefficients: :mod:`dsq_fairseq.cost.coefficients`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, Optional, Tuple, Union

from dsq_fairseq.cost.coefficients import REFERENCE_MAC_UNITS, UNQUANTIZED_WIDTH, value
from dsq_fairseq.precision import FULL_PRECISION, Precision, QuantScheme

#: The paper's reference: every operand 32-bit fixed point (1.00x).
FIXED32: Tuple[QuantScheme, Precision] = (QuantScheme(format="fixed"), Precision(32, 32, 32, 32))
#: The paper's 16-bit fixed-point baseline (0.25x arithmetic, 0.50x DRAM).
FIXED16: Tuple[QuantScheme, Precision] = (QuantScheme(format="fixed"), Precision(16, 16, 16, 16))

KINDS = ("linear", "matmul")


# ------------------------------------------------------------------------------------------------
# one operand / one tensor


Point = Union[int, str]  # a width 2..32, or an OCP MX format name (``--dsq-format mx``)


def _mx(point: str):
    from dsq_fairseq.quant import MX  # only needed (and only present) with MX points

    return MX(point)


def is_quantized(scheme: QuantScheme, width: Point) -> bool:
    """Whether a point is quantized under ``scheme`` (else it holds fp32 values)."""
    if not scheme.enabled:
        return False
    return isinstance(width, str) or width < FULL_PRECISION


def multiplier_width(scheme: QuantScheme, width: Point) -> int:
    """Bits entering the multiplier: the width (sign included); 32 for an unquantized operand;
    for an MX point its element's significand: INT8 8 bits, FP ``1 + 1 + m`` (sign, implicit
    bit, ``m`` mantissa bits)."""
    if not is_quantized(scheme, width):
        return UNQUANTIZED_WIDTH
    if isinstance(width, str):
        mx = _mx(width)
        return mx.element_bits if mx.exponent_bits == 0 else 2 + mx.mantissa_bits
    return width


def _mx_exponent_bits(scheme: QuantScheme, width: Point) -> int:
    """Per-element exponent bits of an MX floating-point element (0 otherwise)."""
    if isinstance(width, str) and is_quantized(scheme, width):
        return _mx(width).exponent_bits
    return 0


def _per_vector_scale(scheme: QuantScheme, is_weight: bool) -> bool:
    """Int: does this tensor carry one scale per vector (as ``QuantScheme.quantize`` does)?"""
    return scheme.int_granularity_for(is_weight) != "tensor"


def tensor_bits(
    scheme: QuantScheme, width: Point, rows: int, length: int, is_weight: bool = False
) -> float:
    """Bits of a tensor of ``rows`` vectors of ``length`` elements, blocked along ``length``.

    Unquantized: 32 bits per element. Fixed: ``width`` per element (the per-tensor scale is not
    counted). BFP: ``width`` per element + ``e`` per block of ``B`` (a tail is its own block).
    Int: ``width`` per element + a 32-bit scale per vector when the granularity gives this
    tensor one (weights: channel/token; activations and gradients: token). MX (a format name as
    the point): element bits + an 8-bit E8M0 scale per block of 32.
    """
    elements = rows * length
    if not is_quantized(scheme, width):
        return float(UNQUANTIZED_WIDTH * elements)
    if isinstance(width, str):  # MX: element bits + one E8M0 scale per block of 32
        mx = _mx(width)
        blocks = rows * math.ceil(length / mx.block_size)
        return float(mx.element_bits * elements + blocks * value("mx_scale_bits"))
    bits = float(width * elements)
    if scheme.format == "bfp":
        blocks = rows * math.ceil(length / scheme.block_size)
        bits += blocks * scheme.exponent_bits * value("bfp_exponent_storage")
    elif scheme.format == "int":
        if _per_vector_scale(scheme, is_weight):
            bits += rows * value("int_scale_bits")
    else:  # fixed
        bits += value("fixed_scale_bits")
    return bits


# ------------------------------------------------------------------------------------------------
# one sub-GEMM


def gemm_arith(
    scheme: QuantScheme, width_a: Point, width_b: Point, batch: int, m: int, k: int, n: int
) -> float:
    """Arithmetic of ``batch x [m, k] @ [k, n]`` (reduction over ``k``), in Fixed32-MAC units."""
    macs = batch * m * k * n
    wa, wb = multiplier_width(scheme, width_a), multiplier_width(scheme, width_b)
    units = macs * wa * wb * value("multiply_units_per_bit_product")
    units += macs * value("accumulate_units")
    quantized = is_quantized(scheme, width_a) or is_quantized(scheme, width_b)
    outputs = batch * m * n
    if isinstance(width_a, str) or isinstance(width_b, str):
        if not quantized:
            return units / REFERENCE_MAC_UNITS
        # MX: FP elements add their exponents and align each product into the block's
        # integer accumulator; every block of 32 then works like a BFP block with an 8-bit
        # (E8M0) shared exponent.
        ea = max(_mx_exponent_bits(scheme, width_a), _mx_exponent_bits(scheme, width_b))
        if ea:
            units += macs * (
                ea * value("mx_element_exponent_add_units_per_bit")
                + (wa + wb) * value("mx_product_align_units_per_bit")
            )
        block = _mx(width_a if isinstance(width_a, str) else width_b).block_size
        blocks = outputs * math.ceil(k / block)
        units += blocks * (
            value("mx_scale_bits") * value("bfp_exponent_add_units_per_bit")
            + (wa + wb + math.ceil(math.log2(block))) * value("bfp_block_align_units_per_bit")
        )
    elif quantized and scheme.format == "bfp":
        block = scheme.block_size
        blocks = outputs * math.ceil(k / block)
        partial_sum_bits = wa + wb + math.ceil(math.log2(block))
        units += blocks * (
            scheme.exponent_bits * value("bfp_exponent_add_units_per_bit")
            + partial_sum_bits * value("bfp_block_align_units_per_bit")
        )
    elif quantized and scheme.format == "int":
        units += outputs * value("int_rescale_units")
    return units / REFERENCE_MAC_UNITS


@dataclass(frozen=True)
class SubGemm:
    """One of the (up to) three GEMMs a DSQ GEMM runs: ``batch x [m, k] @ [k, n]``."""

    name: str  # forward | grad_a | grad_b
    batch: int
    m: int
    k: int
    n: int
    point_a: str  # which of q0..q3 the left operand is at
    point_b: str

    @property
    def macs(self) -> int:
        return self.batch * self.m * self.k * self.n


def sub_gemms(kind: str, batch: int, m: int, k: int, n: int, training: bool) -> List[SubGemm]:
    """The GEMMs of one DSQ GEMM record, with the quantization point of each operand."""
    if kind not in KINDS:
        raise ValueError(f"unknown GEMM kind {kind!r}; expected one of {KINDS}")
    out = [SubGemm("forward", batch, m, k, n, "q0", "q0")]
    if training:
        out.append(SubGemm("grad_a", batch, m, n, k, "q2", "q2"))
        if kind == "linear":  # dW = Q3(g)^T @ x~ (stash at q1, not re-quantized)
            out.append(SubGemm("grad_b", batch, k, m, n, "q3", "q1"))
        else:  # dB = Q3(Q2(A~)^T @ Q2(g))
            out.append(SubGemm("grad_b", batch, k, m, n, "q2", "q2"))
    return out


@dataclass(frozen=True)
class Transfer:
    """One DRAM read or write of a tensor of ``rows`` vectors of ``length`` elements."""

    step: str  # forward | stash | grad_a | grad_b
    tensor: str
    direction: str  # read | write
    point: str  # q0..q3
    rows: int
    length: int
    is_weight: bool = False


def dram_transfers(kind: str, batch: int, m: int, k: int, n: int, training: bool) -> List[Transfer]:
    """Every DRAM transfer of one DSQ GEMM, with the quantization point it is stored at.

    Forward: read ``A`` and ``B`` at q0, write ``C`` at q0 (the next GEMM reads it at q0).
    Training adds: write the stashes ``A~``, ``B~`` at q1; ``grad_a`` reads ``dC`` at q3 (the
    gradient output of the layer above) and ``B~`` at q1, writes ``dA`` at q3; ``grad_b`` reads
    ``A~`` at q1 and ``dC`` at q3, writes ``dB`` at q3 (for a linear, the weight gradient).
    Blocking follows ``dsq_fairseq/nn/functional.py`` (``length`` is the blocked dimension).
    """
    weight = kind == "linear"
    b = batch
    out = [
        Transfer("forward", "A", "read", "q0", b * m, k),
        Transfer("forward", "B", "read", "q0", b * n, k, weight),
        Transfer("forward", "C", "write", "q0", b * m, n),
    ]
    if training:
        out += [
            Transfer("stash", "A~", "write", "q1", b * k, m),
            Transfer("stash", "B~", "write", "q1", b * k, n, weight),
            Transfer("grad_a", "dC", "read", "q3", b * m, n),
            Transfer("grad_a", "B~", "read", "q1", b * k, n, weight),
            Transfer("grad_a", "dA", "write", "q3", b * m, k),
            Transfer("grad_b", "A~", "read", "q1", b * k, m),
            Transfer("grad_b", "dC", "read", "q3", b * m, n),
            Transfer("grad_b", "dB", "write", "q3", b * n, k, weight),
        ]
    return out


# ------------------------------------------------------------------------------------------------
# costs


@dataclass
class Cost:
    """Additive cost: MACs run, arithmetic (Fixed32-MAC equivalents), DRAM bits read/written."""

    macs: float = 0.0
    arith: float = 0.0
    dram_read: float = 0.0
    dram_write: float = 0.0

    @property
    def dram(self) -> float:
        return self.dram_read + self.dram_write

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> Cost:
        return Cost(*(getattr(self, f.name) * factor for f in fields(self)))

    def as_dict(self) -> Dict[str, float]:
        out = asdict(self)
        out["dram"] = self.dram
        return out


def _width(precision: Precision, point: str) -> Point:
    return getattr(precision, point)


def gemm_cost(
    kind: str,
    batch: int,
    m: int,
    k: int,
    n: int,
    training: bool,
    precision: Precision,
    scheme: QuantScheme,
) -> Cost:
    """Cost of one DSQ GEMM (forward, and the two backward GEMMs when ``training``)."""
    cost = Cost()
    for g in sub_gemms(kind, batch, m, k, n, training):
        cost.macs += g.macs
        cost.arith += gemm_arith(
            scheme, _width(precision, g.point_a), _width(precision, g.point_b),
            g.batch, g.m, g.k, g.n,
        )
    for t in dram_transfers(kind, batch, m, k, n, training):
        bits = tensor_bits(scheme, _width(precision, t.point), t.rows, t.length, t.is_weight)
        if t.direction == "read":
            cost.dram_read += bits
        else:
            cost.dram_write += bits
    return cost


def record_cost(record, scheme: QuantScheme, precision: Optional[Precision] = None) -> Cost:
    """Cost of a :class:`~dsq_fairseq.nn.runtime.GemmRecord` at its own (or another) precision."""
    return gemm_cost(
        record.kind, record.batch, record.m, record.k, record.n, record.training,
        record.precision if precision is None else precision, scheme,
    )


#: ``(kind, batch, m, k, n, training, precision)``: what a GEMM's cost depends on.
ShapeKey = Tuple[str, int, int, int, int, bool, Precision]


def shape_key(record) -> ShapeKey:
    return (record.kind, record.batch, record.m, record.k, record.n, record.training,
            record.precision)


def costs_of(
    counts: Dict[ShapeKey, int], scheme: QuantScheme, precision: Optional[Precision] = None
) -> Cost:
    """Total cost of ``{shape key: number of calls}``, each at its own or the given precision."""
    total = Cost()
    for (kind, batch, m, k, n, training, own), count in counts.items():
        p = own if precision is None else precision
        total = total + gemm_cost(kind, batch, m, k, n, training, p, scheme).scaled(count)
    return total


@dataclass
class Comparison:
    """A cost next to the same shapes at Fixed(32) and Fixed(16)."""

    cost: Cost
    fixed32: Cost
    fixed16: Cost

    def __add__(self, other: Comparison) -> Comparison:
        return Comparison(
            self.cost + other.cost, self.fixed32 + other.fixed32, self.fixed16 + other.fixed16
        )

    def scaled(self, factor: float) -> Comparison:
        return Comparison(
            self.cost.scaled(factor), self.fixed32.scaled(factor), self.fixed16.scaled(factor)
        )

    def ratios(self) -> Dict[str, float]:
        """``arith_vs_fixed32``, ``dram_vs_fixed32``, ``arith_vs_fixed16``, ``dram_vs_fixed16``."""
        return ratios(self.cost, self.fixed32, self.fixed16)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ratios(cost: Cost, fixed32: Cost, fixed16: Cost) -> Dict[str, float]:
    return {
        "arith_vs_fixed32": _ratio(cost.arith, fixed32.arith),
        "dram_vs_fixed32": _ratio(cost.dram, fixed32.dram),
        "arith_vs_fixed16": _ratio(cost.arith, fixed16.arith),
        "dram_vs_fixed16": _ratio(cost.dram, fixed16.dram),
    }


def compare(
    counts: Dict[ShapeKey, int], scheme: QuantScheme, precision: Optional[Precision] = None
) -> Comparison:
    """``counts`` costed at ``scheme`` (own or given precision), at Fixed(32) and at Fixed(16)."""
    return Comparison(
        costs_of(counts, scheme, precision),
        costs_of(counts, FIXED32[0], FIXED32[1]),
        costs_of(counts, FIXED16[0], FIXED16[1]),
    )


def count_records(records: Iterable) -> Dict[ShapeKey, int]:
    """``{shape key: calls}`` of an iterable of GEMM records."""
    counts: Dict[ShapeKey, int] = {}
    for r in records:
        key = shape_key(r)
        counts[key] = counts.get(key, 0) + 1
    return counts


__all__ = [
    "FIXED16",
    "FIXED32",
    "Comparison",
    "Cost",
    "SubGemm",
    "Transfer",
    "compare",
    "costs_of",
    "count_records",
    "dram_transfers",
    "gemm_arith",
    "gemm_cost",
    "is_quantized",
    "multiplier_width",
    "ratios",
    "record_cost",
    "shape_key",
    "sub_gemms",
    "tensor_bits",
]
