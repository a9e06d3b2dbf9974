"""Static analysis: GEMM shapes of a real 1-layer model, and ``python -m dsq_fairseq.cost``."""

import json
import sys

import pytest
from conftest import REPO, TINY_MODEL_ARGS, run

from dsq_fairseq.cost.__main__ import analyse, main, trace_gemms
from dsq_fairseq.cost.model import gemm_cost
from dsq_fairseq.precision import QuantScheme

# The tiny model of conftest: 1+1 layers, embed 32, FFN 64, 2 heads (head_dim 16).
# Dummy batch: 3 sentences, source length 5 (15 tokens), target length 4 (12 tokens).
# Hand-computed forward GEMMs: (kind, batch, m, k, n) and MACs = batch * m * k * n.
HAND = {
    "encoder.layers.0.self_attn.q_proj": (("linear", 1, 15, 32, 32), 15360),
    "encoder.layers.0.self_attn.k_proj": (("linear", 1, 15, 32, 32), 15360),
    "encoder.layers.0.self_attn.v_proj": (("linear", 1, 15, 32, 32), 15360),
    "encoder.layers.0.self_attn.qk": (("matmul", 6, 5, 16, 5), 2400),  # 3 x 2 heads
    "encoder.layers.0.self_attn.pv": (("matmul", 6, 5, 5, 16), 2400),
    "encoder.layers.0.self_attn.out_proj": (("linear", 1, 15, 32, 32), 15360),
    "encoder.layers.0.fc1": (("linear", 1, 15, 32, 64), 30720),
    "encoder.layers.0.fc2": (("linear", 1, 15, 64, 32), 30720),
    "decoder.layers.0.self_attn.q_proj": (("linear", 1, 12, 32, 32), 12288),
    "decoder.layers.0.self_attn.k_proj": (("linear", 1, 12, 32, 32), 12288),
    "decoder.layers.0.self_attn.v_proj": (("linear", 1, 12, 32, 32), 12288),
    "decoder.layers.0.self_attn.qk": (("matmul", 6, 4, 16, 4), 1536),
    "decoder.layers.0.self_attn.pv": (("matmul", 6, 4, 4, 16), 1536),
    "decoder.layers.0.self_attn.out_proj": (("linear", 1, 12, 32, 32), 12288),
    "decoder.layers.0.encoder_attn.q_proj": (("linear", 1, 12, 32, 32), 12288),
    "decoder.layers.0.encoder_attn.k_proj": (("linear", 1, 15, 32, 32), 15360),  # encoder out
    "decoder.layers.0.encoder_attn.v_proj": (("linear", 1, 15, 32, 32), 15360),
    "decoder.layers.0.encoder_attn.qk": (("matmul", 6, 4, 16, 5), 1920),
    "decoder.layers.0.encoder_attn.pv": (("matmul", 6, 4, 5, 16), 1920),
    "decoder.layers.0.encoder_attn.out_proj": (("linear", 1, 12, 32, 32), 12288),
    "decoder.layers.0.fc1": (("linear", 1, 12, 32, 64), 24576),
    "decoder.layers.0.fc2": (("linear", 1, 12, 64, 32), 24576),
}
HAND_FORWARD_MACS = 288192  # sum of the above, without the output projection (12 x 32 x V)


def traced(data_bin, device):
    from test_model import build

    task, model, _ = build(data_bin)
    return task, trace_gemms(model, task, 3, 5, 4, training=True, device=device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_one_layer_model_gemm_shapes_and_macs_match_hand_count(data_bin, device):
    task, records = traced(data_bin, device)
    vocab = len(task.target_dictionary)
    by_name = {r.name: r for r in records}
    assert len(records) == len(by_name) == len(HAND) + 1  # each GEMM ran once
    assert sum(macs for _, macs in HAND.values()) == HAND_FORWARD_MACS
    for name, (shape, macs) in HAND.items():
        r = by_name[name]
        assert (r.kind, r.batch, r.m, r.k, r.n) == shape, name
        assert r.batch * r.m * r.k * r.n == macs, name
        assert r.training
    out = by_name["decoder.output_projection"]
    assert (out.kind, out.batch, out.m, out.k, out.n) == ("linear", 1, 12, 32, vocab)
    # training MACs: forward + input-gradient + weight-gradient GEMM, each of the same size
    fixed32 = sum(
        gemm_cost(r.kind, r.batch, r.m, r.k, r.n, True, r.precision, QuantScheme("fixed")).macs
        for r in records
    )
    assert fixed32 == 3 * (HAND_FORWARD_MACS + 12 * 32 * vocab)


TINY_CLI = ["--vocab-size", "100", "--tokens", "40", "--src-len", "5", "--tgt-len", "4",
            *TINY_MODEL_ARGS]


@pytest.mark.parametrize("fmt", ["bfp", "fixed", "int", "none"])
def test_every_format_and_several_levels(fmt):
    result = analyse(["--format", fmt, "--precision", "16,16,16,16;32,32,32,32",
                      "--steps-per-level", "1,3", *TINY_CLI])
    assert result["batch"]["sentences"] == 8 and len(result["levels"]) == 2
    assert result["gemm_calls_per_step"] == len(HAND) + 1
    if fmt == "fixed":  # exact: (1 step at 0.25 + 3 steps at 1.0) / 4
        assert result["arith_vs_fixed32"] == pytest.approx((0.25 + 3) / 4)
        assert result["dram_vs_fixed32"] == pytest.approx((0.5 + 3) / 4)
        assert result["arith_vs_fixed16"] == pytest.approx((1 + 3 * 4) / 4)
    elif fmt == "none":
        assert result["arith_vs_fixed32"] == result["dram_vs_fixed32"] == 1.0
    else:
        assert 0.25 < result["arith_vs_fixed32"] < 1.0
    assert result["levels"][1]["arith_vs_fixed32"] == 1.0


def test_cli_json_keys(tmp_path):
    proc = run([sys.executable, "-m", "dsq_fairseq.cost", "--arch", "dsq_transformer_iwslt_de_en",
                "--format", "bfp", "--precision", "16,4,4,16", *TINY_CLI, "--json"], cwd=REPO)
    result = json.loads(proc.stdout)
    for key in ("arith_vs_fixed32", "dram_vs_fixed32", "arith_vs_fixed16", "dram_vs_fixed16"):
        assert 0 < result[key] < 1, key
    gemms = result["levels"][0]["gemms"]
    assert {g["name"] for g in gemms} >= set(HAND)
    assert all({"macs", "arith", "dram_read", "dram_write"} <= set(g) for g in gemms)


def test_cli_text_and_errors(capsys):
    assert main(["--format", "fixed", "--precision", "16,16,16,16", *TINY_CLI]) == 0
    text = capsys.readouterr().out
    assert "decoder.output_projection" in text
    assert "arith_vs_fixed32=0.2500 dram_vs_fixed32=0.5000" in text
    assert main(["--precision", "16,4,4", *TINY_CLI]) == 2
    assert "--precision" in capsys.readouterr().err
    assert main(["--precision", "16,4,4,16;8,8,8,8", "--steps-per-level", "1,2,3",
                 *TINY_CLI]) == 2
    assert "--steps-per-level" in capsys.readouterr().err
