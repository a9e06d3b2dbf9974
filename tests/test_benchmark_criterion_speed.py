"""``benchmarks/criterion_speed.py`` runs and reports what it promises (tiny sizes; no timing
is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "criterion_speed.py"


def test_criterion_speed_reports_json_and_identical_gradients(capsys):
    spec = importlib.util.spec_from_file_location("criterion_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--tokens", "64", "--vocab", "50", "--repeats", "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert report["bit_identical"] is True
    assert set(report["ms_median"]) == {"fairseq_autograd", "dsq_direct"}
    assert report["time_vs_fairseq"] > 0
