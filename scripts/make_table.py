#!/usr/bin/env python
"""Collect finished runs into a Markdown table shaped like the paper's Table 1.

    python scripts/make_table.py RUN_DIR [RUN_DIR ...] [--out table.md]
    python scripts/make_table.py runs/iwslt17            # every sub-directory with an eval.json

A run directory is a ``scripts/train.sh`` save dir after ``scripts/evaluate.sh``: ``run.json``
(dataset, row, format, schedule), ``eval.json`` (sacreBLEU, fairseq BLEU) and, when the cost model
ran, ``dsq_cost.json`` (``arith_vs_fixed32`` ... ``dram_vs_fixed16``). BLEU deltas are against the
``fp32`` row of the same dataset; a missing value prints as ``-``.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROW_ORDER = [
    "fp32", "fixed32", "fixed16", "bfp32", "bfp16", "stash_fixed", "stash_bfp", "dsq",
    "stash_bfp_16_2_2_16", "stash_bfp_16_8_8_16", "stash_bfp_8_4_4_16",
    "fixed_8_8_8_32", "fixed_8_8_8_16", "fixed_8_8_8_8",
]

# The paper's Table 1 (IWSLT17): cost vs Fixed32 (arithmetic / DRAM), for comparison.
PAPER_COST = {
    "fixed16": (0.25, 0.50), "bfp32": (0.56, 1.13), "bfp16": (0.18, 0.63),
    "stash_fixed": (0.13, 0.31), "stash_bfp": (0.10, 0.45),
}


def _read(path: Path) -> Optional[Dict]:
    return json.loads(path.read_text()) if path.exists() else None


def collect(dirs: List[Path]) -> List[Dict]:
    """One record per run directory that holds a ``run.json``."""
    runs = []
    for d in dirs:
        candidates = [d] if (d / "run.json").exists() else sorted(p.parent for p in
                                                                   d.glob("*/run.json"))
        for run_dir in candidates:
            run = _read(run_dir / "run.json")
            runs.append({"dir": str(run_dir), **run, "eval": _read(run_dir / "eval.json"),
                         "cost": _read(run_dir / "dsq_cost.json")})
    order = {row: i for i, row in enumerate(ROW_ORDER)}
    return sorted(runs, key=lambda r: (r["dataset"], order.get(r["row"], len(order)), r["row"]))


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(runs: List[Dict]) -> str:
    lines = []
    for dataset in sorted({r["dataset"] for r in runs}):
        rows = [r for r in runs if r["dataset"] == dataset]
        base = next((r["eval"]["bleu"] for r in rows if r["row"] == "fp32" and r["eval"]), None)
        lines += [
            f"### {dataset}", "",
            "| method | format | precision | BLEU | Δ vs FP32 | fairseq BLEU | arith vs Fixed32 |"
            " DRAM vs Fixed32 | arith vs Fixed16 | DRAM vs Fixed16 | paper arith / DRAM |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            ev, cost = r["eval"] or {}, r["cost"] or {}
            bleu = ev.get("bleu")
            delta = None if bleu is None or base is None else bleu - base
            paper = PAPER_COST.get(r["row"])
            paper_text = f"{paper[0]:.2f}x / {paper[1]:.2f}x" if paper else "-"
            lines.append(
                f"| {r['row']} | {r['format']} | {r['schedule']} | {_fmt(bleu, '.2f')} | "
                f"{_fmt(delta, '+.2f')} | {_fmt(ev.get('fairseq_tokenized_bleu'), '.2f')} | "
                f"{_fmt(cost.get('arith_vs_fixed32'), '.3f')} | "
                f"{_fmt(cost.get('dram_vs_fixed32'), '.3f')} | "
                f"{_fmt(cost.get('arith_vs_fixed16'), '.3f')} | "
                f"{_fmt(cost.get('dram_vs_fixed16'), '.3f')} | "
                f"{paper_text} |"
            )
        signatures = sorted({r["eval"]["signature"] for r in rows if r["eval"]})
        lines += [""] + [f"sacreBLEU: `{s}`" for s in signatures] + [""]
    return "\n".join(lines)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    runs = collect(args.dirs)
    if not runs:
        print(f"no run.json under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    table = markdown(runs)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
