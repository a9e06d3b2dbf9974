"""The reproduction scripts end to end on a small local corpus: train.sh -> evaluate.sh ->
make_table.py, for the FP32, stash-BFP and DSQ rows (the downloads are not exercised here)."""

import json

import pytest
from conftest import REPO, run

ROWS = ["fp32", "stash_bfp", "dsq"]
SMALL = ["+model.encoder_layers=1", "+model.decoder_layers=1", "+model.encoder_embed_dim=32",
         "+model.decoder_embed_dim=32", "+model.encoder_ffn_embed_dim=64",
         "+model.decoder_ffn_embed_dim=64", "+model.encoder_attention_heads=2",
         "+model.decoder_attention_heads=2", "generation.max_len_b=20"]


@pytest.fixture(scope="module")
def runs(spm_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    env = {"DATA_BIN": str(spm_data / "data-bin"), "MAX_UPDATE": "6", "ARCH":
           "dsq_transformer_iwslt_de_en", "CPU": "1", "LOG_INTERVAL": "1", "PATIENCE": "1",
           "WARMUP_UPDATES": "2", "MAX_TOKENS": "16384"}
    for row in ROWS:
        run(["bash", str(REPO / "scripts" / "train.sh"), "iwslt17", row, *SMALL], cwd=root,
            env={**env, "SAVE_DIR": str(root / row)})
        run(["bash", str(REPO / "scripts" / "evaluate.sh"), str(root / row)], cwd=root,
            env={"NUM_AVG": "2", "BEAM": "2", "CPU": "1"})
    return root


def test_every_row_trained_and_was_evaluated(runs):
    for row in ROWS:
        run_info = json.loads((runs / row / "run.json").read_text())
        assert run_info["row"] == row and run_info["dataset"] == "iwslt17"
        result = json.loads((runs / row / "eval.json").read_text())
        assert result["hypotheses"] == 40
        assert result["signature"].startswith("nrefs:1")
        assert 0.0 <= result["bleu"] <= 100.0 and result["fairseq_tokenized_bleu"] is not None
        assert len(result["checkpoints_averaged"]) == 2


def test_rows_ran_their_own_precision(runs):
    stash_log = (runs / "stash_bfp" / "train.log").read_text()
    assert "dsq_q0=16, dsq_q1=4, dsq_q2=4, dsq_q3=16" in stash_log
    assert "dsq_q0=2, dsq_q1=2, dsq_q2=2, dsq_q3=16" in (runs / "dsq" / "train.log").read_text()


def test_make_table_collects_the_runs(runs, tmp_path):
    out = tmp_path / "table.md"
    proc = run(["python", str(REPO / "scripts" / "make_table.py"), str(runs), "--out", str(out)],
                cwd=tmp_path)
    table = out.read_text()
    assert table.rstrip("\n") == proc.stdout.rstrip("\n")
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert [ln.split(" | ")[0][2:] for ln in lines[1:]] == ["fp32", "stash_bfp", "dsq"]
    assert "| fp32 | none | 32,32,32,32 |" in table and "+0.00" in table
    assert "0.10x / 0.45x" in table  # the paper's stash-BFP cost, for comparison


def test_unknown_row_is_a_clear_error(spm_data, tmp_path):
    proc = run(["bash", str(REPO / "scripts" / "train.sh"), "iwslt17", "fp64"], cwd=tmp_path,
               check=False)
    assert proc.returncode == 2
    assert "unknown row 'fp64'" in proc.stderr and "stash_bfp" in proc.stderr
