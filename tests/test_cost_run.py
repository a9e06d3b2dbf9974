"""Per-run accounting in a real ``fairseq-train`` (level rise, resume) and the run report."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL_ARGS, fairseq_cmd, run

from dsq_fairseq.cost.report import write_report


def train(data_bin: Path, save_dir: Path, max_update: int):
    return run(
        [fairseq_cmd("fairseq-train"), str(data_bin), "--user-dir", str(REPO / "dsq_fairseq"),
         "--task", "dsq_translation", "--arch", "dsq_transformer_iwslt_de_en", *TINY_MODEL_ARGS,
         "--dsq-format", "bfp", "--dsq-schedule", "2,2,2,16;16,4,4,16",
         # the second validation round is "no improvement": the level rises after update 2
         "--dsq-patience", "1", "--dsq-min-delta", "100",
         "--optimizer", "adam", "--lr", "1e-3", "--criterion", "label_smoothed_cross_entropy",
         "--max-tokens", "500", "--max-update", str(max_update), "--seed", "1", "--cpu",
         "--validate-interval-updates", "1", "--save-interval-updates", "1",
         "--no-epoch-checkpoints", "--keep-interval-updates", "1", "--log-format", "simple",
         "--log-interval", "1", "--save-dir", str(save_dir)],
        cwd=save_dir.parent,
    )


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cost_run")
    save_dir = tmp / "checkpoints"
    first = train(data_bin, save_dir, 2)
    resumed = train(data_bin, save_dir, 3)
    log = "".join(p.stdout + p.stderr for p in (first, resumed))
    (save_dir / "train.log").write_text(log)
    return save_dir, log


def test_cost_json_accumulates_per_level_across_a_resume(trained):
    save_dir, log = trained
    report = json.loads((save_dir / "dsq_cost.json").read_text())
    assert report["num_updates"] == 3 and report["totals"]["updates"] == 3
    assert [lv["updates"] for lv in report["levels"]] == [2, 1]
    assert [lv["precision"] for lv in report["levels"]] == ["2,2,2,16", "16,4,4,16"]
    assert [(h["num_updates"], h["level"]) for h in report["history"]] == [(1, 0), (2, 0), (3, 1)]
    level0, level1 = report["levels"]
    # the 2-bit level is far cheaper than [16,4,4,16]; both cheaper than Fixed16
    assert 0 < level0["arith_vs_fixed32"] < level1["arith_vs_fixed32"] < 0.25
    assert 0 < level0["dram_vs_fixed32"] < level1["dram_vs_fixed32"] < 0.5
    for key in ("arith_vs_fixed32", "dram_vs_fixed32", "arith_vs_fixed16", "dram_vs_fixed16"):
        assert report[key] == report["totals"][key]
    assert report["totals"]["macs"] == level0["macs"] + level1["macs"]
    assert "Loaded checkpoint" in log


def test_metrics_are_logged_and_the_ledger_is_checkpointed(trained):
    save_dir, log = trained
    inner = re.findall(r"train_inner .*dsq_arith_rel=([0-9.]+).*dsq_dram_vs_fixed16=([0-9.]+)",
                       log)
    assert len(inner) == 3
    assert re.search(r"valid on 'valid' subset .*\| dsq_arith_rel [0-9.]+ \| dsq_dram_rel", log)
    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=True, map_location="cpu")
    totals = state["model"]["dsq_cost.totals"]
    assert totals.dtype == torch.float64 and totals[:, 0].tolist() == [2.0, 1.0]


def test_report_writes_plots_and_markdown(trained, tmp_path):
    save_dir, _ = trained
    files = write_report(str(save_dir))
    for f in files:
        assert Path(f).parent == save_dir and Path(f).stat().st_size > 0
    for png in files[:2]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = Path(files[2]).read_text()
    assert "## Per precision level" in md and "| 1 | 16,4,4,16 | 1 |" in md
    assert "after update 2: level 0 [2,2,2,16] -> level 1 [16,4,4,16]" in md
    # the command, given the log instead of the save dir, writes where --out says
    out = tmp_path / "report"
    proc = run([sys.executable, "-m", "dsq_fairseq.report", str(save_dir / "train.log"),
                "--out", str(out)], cwd=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["cost.png", "report.md", "valid_loss.png"]
    assert "report.md" in proc.stdout
