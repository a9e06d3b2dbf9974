"""Plots and a Markdown summary of a DSQ run: ``python -m dsq_fairseq.report PATH``.

``PATH`` is a save dir (``--save-dir`` of ``fairseq-train``), a ``dsq_cost.json`` or a
``fairseq-train`` log written with ``--log-format simple`` (e.g. ``... 2>&1 | tee train.log``).
Sources, all optional but at least one needed:

* ``dsq_cost.json`` — in the save dir (for a log: next to it, or in the ``save_dir`` the log's
  config line names): cumulative totals per level and one history entry per validation round;
* ``train.log`` — for a save dir: ``<save-dir>/train.log``, else ``<save-dir>/../train.log``
  (the layout of ``scripts/demo.sh``), else ``--log``. Its ``valid`` lines give the validation
  loss, ``dsq_level`` and the cumulative ``dsq_*`` cost metrics, its ``train_inner`` lines the
  cost curve at ``--log-interval`` resolution.

Writes ``valid_loss.png`` (validation loss, level changes marked), ``cost.png`` (cumulative
arithmetic and DRAM cost vs Fixed16 and vs Fixed32 over updates) and ``report.md`` into ``--out``
(default: the save dir, or the directory of the given file).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dsq_fairseq.cost.accounting import COST_JSON

_NUM = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
_VALID_LINE = re.compile(r"\|\s*valid on '([^']+)' subset\s*\|(.*)$")
_PIPE_KV = re.compile(r"\|\s*([A-Za-z_][\w]*)\s+(" + _NUM + r")\s*(?=\||$)")
_EQ_KV = re.compile(r"([A-Za-z_][\w]*)=(" + _NUM + r")")
_TRAIN_LINE = re.compile(r"\|\s*train\s*\|\s*epoch\s+\d+\s*\|")  # end-of-epoch summary
_SAVE_DIR = re.compile(r"""['"]save_dir['"]:\s*['"]([^'"]+)['"]""")
_LEVEL_RISE = re.compile(
    r"precision level (\d+) -> (\d+), \[([\w,]+)\] -> \[([\w,]+)\] after update (\d+)"
)

COST_KEYS = ("dsq_arith_rel", "dsq_dram_rel", "dsq_arith_vs_fixed16", "dsq_dram_vs_fixed16")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


@dataclass
class RunData:
    """Everything the report draws, from whichever sources were found."""

    valid: List[Dict[str, float]] = field(default_factory=list)  # num_updates, loss, level
    cost: List[Dict[str, float]] = field(default_factory=list)  # num_updates + COST_KEYS
    rises: List[Dict[str, Any]] = field(default_factory=list)  # update, from, to, precisions
    cost_json: Optional[Dict[str, Any]] = None
    sources: List[str] = field(default_factory=list)
    save_dir: Optional[str] = None


def parse_log(text: str, data: RunData) -> None:
    """Fill ``data`` from a ``--log-format simple`` fairseq-train log."""
    first_subset = None
    for line in text.splitlines():
        m = _VALID_LINE.search(line)
        if m:
            subset, rest = m.group(1), "|" + m.group(2)
            first_subset = first_subset or subset
            if subset != first_subset:
                continue
            kv = {k: _float(v) for k, v in _PIPE_KV.findall(rest)}
            if "loss" in kv and "num_updates" in kv:
                entry = {"num_updates": kv["num_updates"], "loss": kv["loss"],
                         "level": kv.get("dsq_level", float("nan"))}
                data.valid.append(entry)
                cost = {k: kv[k] for k in COST_KEYS if k in kv}
                if cost:
                    data.cost.append({"num_updates": kv["num_updates"], **cost})
            continue
        if "train_inner" in line or _TRAIN_LINE.search(line):
            kv = {k: _float(v) for k, v in _EQ_KV.findall(line)}
            kv.update({k: _float(v) for k, v in _PIPE_KV.findall(line)})
            cost = {k: kv[k] for k in COST_KEYS if k in kv}
            if cost and "num_updates" in kv:
                data.cost.append({"num_updates": kv["num_updates"], "level":
                                  kv.get("dsq_level", float("nan")), **cost})
            continue
        m = _LEVEL_RISE.search(line)
        if m:
            data.rises.append({"num_updates": int(m.group(5)), "from": int(m.group(1)),
                               "to": int(m.group(2)), "from_precision": m.group(3),
                               "to_precision": m.group(4)})
            continue
        if data.save_dir is None:
            m = _SAVE_DIR.search(line)
            if m:
                data.save_dir = m.group(1)


def apply_cost_json(report: Dict[str, Any], data: RunData) -> None:
    """Fill what the log did not give from a ``dsq_cost.json``."""
    data.cost_json = report
    history = [h for h in report.get("history", []) if isinstance(h, dict)]
    if not data.valid:
        data.valid = [{"num_updates": h["num_updates"], "loss": h["valid_loss"],
                       "level": h.get("level", float("nan"))}
                      for h in history if h.get("valid_loss") is not None]
    if not data.cost:
        data.cost = [{"num_updates": h["num_updates"], **{k: h[k] for k in COST_KEYS if k in h}}
                     for h in history if any(k in h for k in COST_KEYS)]
    if not data.rises:
        levels = report.get("schedule") or []
        for h in history:
            lv, nxt = h.get("level"), h.get("next_level")
            if lv is not None and nxt is not None and nxt != lv:
                data.rises.append({
                    "num_updates": h["num_updates"], "from": lv, "to": nxt,
                    "from_precision": levels[lv] if lv < len(levels) else "?",
                    "to_precision": levels[nxt] if nxt < len(levels) else "?",
                })


def _dedupe(rows: List[Dict[str, float]]) -> List[Dict[str, float]]:
    out: Dict[float, Dict[str, float]] = {}
    for r in rows:
        out[r["num_updates"]] = r  # a resumed log repeats updates: keep the latest
    return [out[k] for k in sorted(out)]


def find_sources(path: str, log: Optional[str] = None) -> Tuple[Optional[str], Optional[str], str]:
    """``(cost json, train log, default output dir)`` for a save dir / json / log path."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        js = os.path.join(path, COST_JSON)
        if log is None:
            for cand in (os.path.join(path, "train.log"),
                         os.path.join(os.path.dirname(path), "train.log")):
                if os.path.isfile(cand):
                    log = cand
                    break
        return (js if os.path.isfile(js) else None), log, path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.endswith(".json"):
        return path, log, os.path.dirname(path)
    js = os.path.join(os.path.dirname(path), COST_JSON)
    return (js if os.path.isfile(js) else None), (log or path), os.path.dirname(path)


def load_run(path: str, log: Optional[str] = None) -> Tuple[RunData, str]:
    js, log_path, out_dir = find_sources(path, log)
    data = RunData()
    if log_path is not None:
        with open(log_path, errors="replace") as f:
            parse_log(f.read(), data)
        data.sources.append(log_path)
        if js is None and data.save_dir:  # a log elsewhere: its save dir holds the json
            save_dir = data.save_dir
            if not os.path.isabs(save_dir):
                save_dir = os.path.join(os.path.dirname(log_path), save_dir)
            cand = os.path.join(save_dir, COST_JSON)
            js = cand if os.path.isfile(cand) else None
    if js is not None:
        with open(js) as f:
            apply_cost_json(json.load(f), data)
        data.sources.append(js)
    if not data.sources:
        raise FileNotFoundError(
            f"{path}: found neither {COST_JSON} nor a train.log (see python -m dsq_fairseq.report "
            "--help for where they are looked for)"
        )
    data.valid = _dedupe(data.valid)
    data.cost = _dedupe(data.cost)
    return data, out_dir


# ------------------------------------------------------------------------------------------------
# plots


def _plt():
    # fairseq's speech tasks call logging.basicConfig(level=DEBUG) on import: keep plots quiet
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mark_rises(ax, rises: List[Dict[str, Any]]) -> None:
    for i, r in enumerate(rises):
        ax.axvline(r["num_updates"], color="tab:red", linestyle="--", linewidth=1,
                   label="level change" if i == 0 else None)
        ax.annotate(f"-> [{r['to_precision']}]", xy=(r["num_updates"], 1.0),
                    xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="tab:red")


def plot_valid_loss(data: RunData, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    pts = [v for v in data.valid if math.isfinite(v["loss"])]
    if pts:
        x = [v["num_updates"] for v in pts]
        y = [v["loss"] for v in pts]
        ax.plot(x, y, color="0.6", linewidth=1)
        levels = sorted({int(v["level"]) for v in pts if math.isfinite(v["level"])})
        for lv in levels:
            sel = [v for v in pts if v["level"] == lv]
            ax.scatter([v["num_updates"] for v in sel], [v["loss"] for v in sel], s=18,
                       label=f"level {lv}", zorder=3)
        if not levels:
            ax.scatter(x, y, s=18, zorder=3)
    else:
        ax.text(0.5, 0.5, "no validation rounds found", ha="center", va="center",
                transform=ax.transAxes)
    _mark_rises(ax, data.rises)
    ax.set_xlabel("updates")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss (DSQ precision level changes marked)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(data: RunData, path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("vs Fixed16", "dsq_arith_vs_fixed16", "dsq_dram_vs_fixed16", 1.0, "Fixed16"),
              ("vs Fixed32", "dsq_arith_rel", "dsq_dram_rel", 1.0, "Fixed32"))
    for ax, (title, ka, kd, ref, ref_name) in zip(axes, panels):
        rows = [c for c in data.cost if ka in c or kd in c]
        if rows:
            for key, label in ((ka, "arithmetic"), (kd, "DRAM traffic")):
                pts = [(c["num_updates"], c[key]) for c in rows
                       if key in c and math.isfinite(c[key])]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
            ax.axhline(ref, color="0.4", linestyle=":", linewidth=1, label=f"{ref_name} = 1")
            ax.set_ylim(bottom=0)
        else:
            ax.text(0.5, 0.5, "no cost metrics found", ha="center", va="center",
                    transform=ax.transAxes)
        _mark_rises(ax, data.rises)
        ax.set_xlabel("updates")
        ax.set_ylabel(f"cumulative cost {title}")
        ax.set_title(f"Cumulative training cost {title}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# markdown


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _times_fewer(x: Optional[float]) -> str:
    return f"{1 / x:.2f}x fewer" if x and math.isfinite(x) else "n/a"


def markdown(data: RunData) -> str:
    lines = ["# DSQ run report", ""]
    lines.append("Sources: " + ", ".join(f"`{s}`" for s in data.sources))
    lines.append("")
    lines.append("Cost model: `docs/cost_model.md` (arithmetic = Fixed32-MAC equivalents, DRAM = "
                 "bits read + written, both relative to the same GEMM shapes at Fixed32 / "
                 "Fixed16).")
    lines.append("")

    final: Dict[str, Any] = {}
    if data.cost_json is not None:
        final = {k: data.cost_json.get(k) for k in
                 ("arith_vs_fixed32", "dram_vs_fixed32", "arith_vs_fixed16", "dram_vs_fixed16")}
        final["num_updates"] = data.cost_json.get("num_updates")
    elif data.cost:
        last = data.cost[-1]
        final = {"arith_vs_fixed32": last.get("dsq_arith_rel"),
                 "dram_vs_fixed32": last.get("dsq_dram_rel"),
                 "arith_vs_fixed16": last.get("dsq_arith_vs_fixed16"),
                 "dram_vs_fixed16": last.get("dsq_dram_vs_fixed16"),
                 "num_updates": int(last["num_updates"])}
    lines += ["## Summary", "", "| | value |", "|---|---|"]
    lines.append(f"| updates | {_fmt(final.get('num_updates'))} |")
    if data.valid:
        best = min(data.valid, key=lambda v: v["loss"])
        lines.append(f"| validation rounds | {len(data.valid)} |")
        lines.append(f"| last validation loss | {_fmt(data.valid[-1]['loss'], 3)} "
                     f"(update {int(data.valid[-1]['num_updates'])}) |")
        lines.append(f"| best validation loss | {_fmt(best['loss'], 3)} "
                     f"(update {int(best['num_updates'])}) |")
    lines.append(f"| arithmetic vs Fixed32 | {_fmt(final.get('arith_vs_fixed32'))}x |")
    lines.append(f"| DRAM traffic vs Fixed32 | {_fmt(final.get('dram_vs_fixed32'))}x |")
    lines.append(f"| arithmetic vs Fixed16 | {_fmt(final.get('arith_vs_fixed16'))}x "
                 f"({_times_fewer(final.get('arith_vs_fixed16'))}) |")
    lines.append(f"| DRAM traffic vs Fixed16 | {_fmt(final.get('dram_vs_fixed16'))}x "
                 f"({_times_fewer(final.get('dram_vs_fixed16'))}) |")
    lines.append("")

    if data.cost_json is not None and data.cost_json.get("levels"):
        lines += ["## Per precision level", "",
                  "| level | [q0,q1,q2,q3] | updates | MACs | arith vs F32 | DRAM vs F32 | "
                  "arith vs F16 | DRAM vs F16 |",
                  "|---|---|---|---|---|---|---|---|"]
        for lv in data.cost_json["levels"]:
            lines.append(
                f"| {lv['level']} | {lv.get('precision')} | {int(lv.get('updates') or 0)} | "
                f"{lv.get('macs', 0):.3g} | {_fmt(lv.get('arith_vs_fixed32'))} | "
                f"{_fmt(lv.get('dram_vs_fixed32'))} | {_fmt(lv.get('arith_vs_fixed16'))} | "
                f"{_fmt(lv.get('dram_vs_fixed16'))} |"
            )
        lines.append("")

    if data.rises:
        lines += ["## Level changes", ""]
        for r in data.rises:
            lines.append(f"- after update {r['num_updates']}: level {r['from']} "
                         f"[{r['from_precision']}] -> level {r['to']} [{r['to_precision']}]")
        lines.append("")

    lines += ["## Plots", "", "![validation loss](valid_loss.png)", "",
              "![cumulative cost](cost.png)", ""]

    if data.valid:
        lines += ["## Validation rounds", "", "| update | loss | level |", "|---|---|---|"]
        for v in data.valid:
            level = int(v["level"]) if math.isfinite(v["level"]) else "n/a"
            lines.append(f"| {int(v['num_updates'])} | {_fmt(v['loss'], 3)} | {level} |")
        lines.append("")
    return "\n".join(lines)


def write_report(path: str, out: Optional[str] = None, log: Optional[str] = None) -> List[str]:
    """Write ``valid_loss.png``, ``cost.png`` and ``report.md``; returns their paths."""
    data, default_out = load_run(path, log)
    out = out or default_out
    os.makedirs(out, exist_ok=True)
    files = [os.path.join(out, n) for n in ("valid_loss.png", "cost.png", "report.md")]
    plot_valid_loss(data, files[0])
    plot_cost(data, files[1])
    with open(files[2], "w") as f:
        f.write(markdown(data))
    return files


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dsq_fairseq.report",
        description="Plots (valid_loss.png, cost.png) and report.md of a DSQ run.",
    )
    p.add_argument("path", help="save dir, dsq_cost.json or a --log-format simple train log")
    p.add_argument("--log", default=None, help="train log (default: searched, see module doc)")
    p.add_argument("--out", default=None, help="output directory (default: next to the input)")
    args = p.parse_args(argv)
    try:
        files = write_report(args.path, args.out, args.log)
    except FileNotFoundError as e:
        sys.stderr.write(f"dsq-fairseq: error: {e}\n")
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
