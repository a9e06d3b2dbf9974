"""The cost model's formulas (docs/cost_model.md), checked against hand-computed numbers."""

import math

import pytest
import torch

from dsq_fairseq.cost import coefficients
from dsq_fairseq.cost.accounting import (
    LEDGER_FIELDS,
    CostAccountant,
    CostLedger,
    field_ratios,
    sum_logging_outputs,
)
from dsq_fairseq.cost.model import (
    FIXED16,
    FIXED32,
    compare,
    count_records,
    gemm_arith,
    gemm_cost,
    tensor_bits,
)
from dsq_fairseq.nn.runtime import GemmRecord
from dsq_fairseq.precision import Precision, QuantScheme

FIXED = QuantScheme(format="fixed")
BFP = QuantScheme(format="bfp", block_size=16, exponent_bits=8)
SHAPES = [
    ("linear", 1, 4080, 512, 512, True),
    ("linear", 1, 4080, 512, 10000, True),
    ("matmul", 544, 30, 128, 30, True),
    ("matmul", 8, 7, 5, 3, False),
    ("linear", 1, 3, 17, 5, False),
]


def rel(kind, batch, m, k, n, training, precision, scheme):
    cost = gemm_cost(kind, batch, m, k, n, training, precision, scheme)
    ref = gemm_cost(kind, batch, m, k, n, training, FIXED32[1], FIXED32[0])
    return cost.arith / ref.arith, cost.dram / ref.dram


@pytest.mark.parametrize("shape", SHAPES)
def test_fixed_point_rows_are_exact_by_formula(shape):
    # the paper's Table 1: Fixed32 1.00x / 1.00x, Fixed16 0.25x / 0.50x
    assert rel(*shape, Precision(32, 32, 32, 32), FIXED) == (1.0, 1.0)
    assert rel(*shape, Precision(16, 16, 16, 16), FIXED) == (0.25, 0.5)
    assert rel(*shape, Precision(8, 8, 8, 8), FIXED) == (1 / 16, 0.25)
    # unquantized ('none', or width 32 in any format) is the 1.00x reference
    assert rel(*shape, Precision(4, 4, 4, 4), QuantScheme(format="none")) == (1.0, 1.0)
    assert rel(*shape, Precision(32, 32, 32, 32), BFP) == (1.0, 1.0)


def test_fixed32_arith_is_counted_in_macs():
    cost = gemm_cost("linear", 1, 6, 8, 4, True, FIXED32[1], FIXED32[0])
    assert cost.macs == 3 * 6 * 8 * 4 and cost.arith == cost.macs


def test_stash_fixed_linear_hand_computed():
    # one linear y = x W^T, x [6, 8], W [4, 8], at Fixed [16, 4, 4, 16]
    cost = gemm_cost("linear", 1, 6, 8, 4, True, Precision(16, 4, 4, 16), FIXED)
    # forward 16x16, input gradient q2 x q2 = 4x4, weight gradient q3 g x q1 stash = 16x4
    assert cost.macs == 3 * 192
    assert cost.arith == 192 * (256 + 16 + 64) / 1024 == 63.0
    # reads:  x 6*8*16 + W 4*8*16 | g 6*4*16 + W~ 8*4*4 | x~ 8*6*4 + g 6*4*16
    assert cost.dram_read == 768 + 512 + 384 + 128 + 192 + 384 == 2368
    # writes: y 6*4*16 | x~ 8*6*4 + W~ 8*4*4 | dx 6*8*16 | dW 4*8*16
    assert cost.dram_write == 384 + 192 + 128 + 768 + 512 == 1984
    ref = gemm_cost("linear", 1, 6, 8, 4, True, FIXED32[1], FIXED32[0])
    assert ref.dram == 32 * (208 + 184)  # 208 elements read, 184 written


def test_stash_matmul_backward_gemms_are_both_q2():
    cost = gemm_cost("matmul", 2, 3, 5, 7, True, Precision(16, 4, 2, 8), FIXED)
    macs = 2 * 3 * 5 * 7
    assert cost.arith == macs * (16 * 16 + 2 * 2 + 2 * 2) / 1024


def test_inference_costs_only_the_forward_gemm():
    cost = gemm_cost("linear", 1, 6, 8, 4, False, Precision(16, 4, 4, 16), FIXED)
    assert cost.macs == 192 and cost.arith == 192 * 256 / 1024
    assert cost.dram_read == (6 * 8 + 4 * 8) * 16 and cost.dram_write == 6 * 4 * 16


def test_bfp_bits_count_one_exponent_per_block_with_tails():
    # 3 vectors of 20 elements, B = 16: blocks of 16 + a tail of 4 -> 2 blocks per vector
    assert tensor_bits(BFP, 4, 3, 20) == 3 * 20 * 4 + 3 * 2 * 8
    assert tensor_bits(BFP, 32, 3, 20) == 3 * 20 * 32  # unquantized: no exponent
    assert tensor_bits(FIXED, 4, 3, 20) == 3 * 20 * 4  # per-tensor scale not counted


def test_bfp_arith_adds_per_block_exponent_and_alignment():
    # [2, 20] @ [20, 3] at 4 x 4 bits: 120 MACs of 16 units, 2*3*ceil(20/16) = 12 blocks
    # each with an 8-bit exponent add and a (4 + 4 + log2 16)-bit partial-sum alignment
    assert gemm_arith(BFP, 4, 4, 1, 2, 20, 3) == (120 * 16 + 12 * (8 + 12)) / 1024
    cost = gemm_cost("linear", 1, 2, 20, 3, False, Precision(4, 4, 4, 4), BFP)
    assert cost.dram == (2 * 20 * 4 + 2 * 2 * 8) + (3 * 20 * 4 + 3 * 2 * 8) + (2 * 3 * 4 + 2 * 8)


def test_int_scales_and_rescale():
    token = QuantScheme(format="int", int_granularity="token")
    channel = QuantScheme(format="int", int_granularity="channel")
    tensor = QuantScheme(format="int", int_granularity="tensor")
    assert tensor_bits(token, 8, 4, 10) == 4 * 10 * 8 + 4 * 32
    assert tensor_bits(channel, 8, 4, 10) == 4 * 10 * 8  # activations: one scale per tensor
    assert tensor_bits(channel, 8, 4, 10, is_weight=True) == 4 * 10 * 8 + 4 * 32
    assert tensor_bits(tensor, 8, 4, 10, is_weight=True) == 4 * 10 * 8
    # one fp32 rescale (1024 units) per output element
    assert gemm_arith(tensor, 8, 8, 1, 2, 10, 3) == (60 * 64 + 6 * 1024) / 1024


def test_bfp16_and_stash_bfp_against_the_paper_rows_on_square_shapes():
    # docs/cost_model.md: BFP16 is within 0.01 of Fixed16 here (0.5 exponent bits per element)
    a, d = rel("linear", 1, 512, 512, 512, True, Precision(16, 16, 16, 16), BFP)
    assert a == pytest.approx(0.25 + 2.75 / 1024)
    assert d == pytest.approx(16.5 / 32)
    a, d = rel("linear", 1, 512, 512, 512, True, Precision(16, 4, 4, 16), FIXED)
    assert a == pytest.approx(336 / 3 / 1024)  # 0.109: the paper's stash-Fixed row says 0.13


def record(kind="linear", m=6, k=8, n=4, batch=1, training=True, precision="16,4,4,16"):
    return GemmRecord(kind, "x", batch, m, k, n, Precision.parse(precision), training)


def test_accountant_counts_training_records_only_while_enabled():
    acc = CostAccountant(FIXED)
    acc(record())  # not enabled: ignored
    acc.start()
    acc(record())
    acc(record())
    acc(record(training=False))  # inference/validation: ignored
    acc(record(kind="matmul", batch=4, m=3, k=2, n=3))
    acc.stop()
    acc(record())
    assert sum(acc.counts.values()) == 3
    out = acc.pop_logging_output()
    assert acc.counts == {}
    lin = gemm_cost("linear", 1, 6, 8, 4, True, Precision(16, 4, 4, 16), FIXED)
    mm = gemm_cost("matmul", 4, 3, 2, 3, True, Precision(16, 4, 4, 16), FIXED)
    assert out["dsq_cost_arith"] == pytest.approx(2 * lin.arith + mm.arith)
    assert out["dsq_cost_dram"] == pytest.approx(2 * lin.dram + mm.dram)
    assert out["dsq_cost_arith_fixed32"] == out["dsq_cost_macs"] == 3 * (2 * 192 + 72)
    assert out["dsq_cost_arith_fixed16"] == out["dsq_cost_macs"] / 4
    assert out["dsq_cost_dram_fixed16"] == out["dsq_cost_dram_fixed32"] / 2


def test_compare_uses_each_records_own_precision():
    counts = count_records([record(precision="16,16,16,16"), record(precision="32,32,32,32")])
    r = compare(counts, FIXED).ratios()
    assert r["arith_vs_fixed32"] == pytest.approx((0.25 + 1.0) / 2)
    assert r["dram_vs_fixed16"] == pytest.approx((0.5 + 1.0) / 2 / 0.5)
    assert FIXED16[1] == Precision(16, 16, 16, 16)


def test_ledger_accumulates_per_level_and_survives_state_dict_and_half():
    ledger = CostLedger(2)
    step = {"macs": 10.0, "arith": 1.0, "dram": 30.0, "arith_fixed32": 10.0,
            "dram_fixed32": 100.0, "arith_fixed16": 2.5, "dram_fixed16": 50.0}
    ledger.add(0, step)
    ledger.add(1, {k: 2 * v for k, v in step.items()})
    assert ledger.level_values(0)["updates"] == 1 and ledger.total_values()["macs"] == 30.0
    m = ledger.metrics()
    assert m["dsq_arith_rel"] == pytest.approx(3.0 / 30.0)
    assert m["dsq_dram_vs_fixed16"] == pytest.approx(90.0 / 150.0)
    ledger.half()
    assert ledger.totals.dtype == torch.float64
    fresh = CostLedger(2)
    fresh.load_state_dict(ledger.state_dict())
    assert torch.equal(fresh.totals, ledger.totals)
    # an older checkpoint without the buffer loads (strictly) and starts at zero
    host = torch.nn.Module()
    host.dsq_cost = CostLedger(2)
    host.load_state_dict({}, strict=True)
    assert not host.dsq_cost.has_data()
    assert len(LEDGER_FIELDS) == host.dsq_cost.totals.shape[1]


def test_logging_output_sums_accept_tensors():
    sums = sum_logging_outputs([{"dsq_cost_macs": torch.tensor(2.0, dtype=torch.double)},
                                {"dsq_cost_macs": 3.0}, {"loss": 1.0}])
    assert sums["macs"] == 5.0 and sums["arith"] == 0.0
    assert math.isnan(field_ratios(sums)["arith_vs_fixed32"])


def test_coefficients_have_sources():
    assert coefficients.REFERENCE_MAC_UNITS == 1024
    for c in coefficients.COEFFICIENTS.values():
        assert c.source and c.unit


def test_mx_points_cost_element_bits_and_e8m0_scales():
    quant = pytest.importorskip("dsq_fairseq.quant")
    if not hasattr(quant, "MX"):
        pytest.skip("MX formats not available")
    mx = QuantScheme(format="mx")
    # MXFP4 (E2M1): 4 bits per element + one 8-bit scale per 32 along the blocked dimension
    assert tensor_bits(mx, "mxfp4", 3, 40) == 3 * 40 * 4 + 3 * 2 * 8
    # [2, 64] @ [64, 3] in MXFP4: significand 1 sign + 1 implicit + 1 mantissa = 3 bits;
    # per product a 2-bit exponent add and a 6-bit alignment; per block of 32 (2 x 3 x 2 blocks)
    # an 8-bit scale add and a (3 + 3 + 5)-bit partial-sum alignment
    macs = 2 * 64 * 3
    assert gemm_arith(mx, "mxfp4", "mxfp4", 1, 2, 64, 3) == (
        macs * 9 + macs * (2 + 6) + 12 * (8 + 11)) / 1024
    # MXINT8: 8 x 8 products, no per-product exponent work
    assert gemm_arith(mx, "mxint8", "mxint8", 1, 2, 64, 3) == (macs * 64 + 12 * (8 + 21)) / 1024
    level = Precision("mxfp8_e4m3", "mxfp4", "mxfp4", 32)
    a, d = rel("linear", 1, 64, 64, 64, True, level, mx)
    assert 0 < a < 1 / 16 and 0 < d < 0.5
