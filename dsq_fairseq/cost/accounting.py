"""Per-run cost accounting: what every training update cost, from the shapes that ran.

Three pieces, wired together by the ``dsq_translation`` task:

* :class:`CostAccountant` — a :class:`~dsq_fairseq.nn.runtime.DSQRuntime` observer. While
  enabled (inside the task's ``train_step`` only) it counts every training GEMM record per
  ``(kind, shape, precision)``; nothing is costed per GEMM call. At the end of a ``train_step``
  :meth:`~CostAccountant.pop_logging_output` costs the counted shapes (at the precision in force,
  at Fixed(32) and at Fixed(16)) into the step's ``logging_output`` under ``dsq_cost_*`` keys,
  so fairseq sums them over ``--update-freq`` micro-batches and all-reduces them over ranks.
* :class:`CostLedger` — an ``nn.Module`` of float64 buffers holding the cumulative totals per
  precision level. It is a submodule of the model, so every checkpoint carries it and
  ``fairseq-train`` resumes with the totals of the checkpoint (the same reason the schedule keeps
  its state in buffers). Every rank adds the same all-reduced numbers, so ranks agree.
* :func:`cost_report` — the JSON written to ``<save-dir>/dsq_cost.json``.

:class:`RunCostTracker` holds all three for the task, whose hooks each call one method of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
from fairseq import metrics

from dsq_fairseq.cost import coefficients
from dsq_fairseq.cost.model import Comparison, ShapeKey, compare, shape_key
from dsq_fairseq.precision import Precision, QuantScheme

logger = logging.getLogger(__name__)

COST_JSON = "dsq_cost.json"
#: Per-update sums carried in fairseq's logging outputs (``dsq_cost_<field>``).
LOG_FIELDS = (
    "macs", "arith", "dram", "arith_fixed32", "dram_fixed32", "arith_fixed16", "dram_fixed16",
)
LOG_PREFIX = "dsq_cost_"
#: Columns of the ledger (per level): updates counted plus :data:`LOG_FIELDS`.
LEDGER_FIELDS = ("updates",) + LOG_FIELDS
#: The metrics logged (cumulative over the run, including before a resume).
METRICS = {
    "dsq_arith_rel": "arith_vs_fixed32",
    "dsq_dram_rel": "dram_vs_fixed32",
    "dsq_arith_vs_fixed16": "arith_vs_fixed16",
    "dsq_dram_vs_fixed16": "dram_vs_fixed16",
}


def comparison_fields(comp: Comparison) -> Dict[str, float]:
    """A :class:`Comparison` as the flat :data:`LOG_FIELDS` dict."""
    return {
        "macs": comp.cost.macs,
        "arith": comp.cost.arith,
        "dram": comp.cost.dram,
        "arith_fixed32": comp.fixed32.arith,
        "dram_fixed32": comp.fixed32.dram,
        "arith_fixed16": comp.fixed16.arith,
        "dram_fixed16": comp.fixed16.dram,
    }


def field_ratios(values: Dict[str, float]) -> Dict[str, float]:
    """``arith_vs_fixed32`` ... ``dram_vs_fixed16`` of a :data:`LOG_FIELDS`-style dict."""

    def r(a: str, b: str) -> float:
        return values[a] / values[b] if values.get(b) else float("nan")

    return {
        "arith_vs_fixed32": r("arith", "arith_fixed32"),
        "dram_vs_fixed32": r("dram", "dram_fixed32"),
        "arith_vs_fixed16": r("arith", "arith_fixed16"),
        "dram_vs_fixed16": r("dram", "dram_fixed16"),
    }


class CostAccountant:
    """Runtime observer counting training GEMM records while :attr:`enabled`.

    The per-call work is one tuple and one dict update; costs are computed by :meth:`pop`.
    Records with ``training=False`` (validation, generation) are never counted.
    """

    def __init__(self, scheme: QuantScheme) -> None:
        self.scheme = scheme
        self.enabled = False
        self.counts: Dict[ShapeKey, int] = {}

    def __call__(self, record) -> None:
        if self.enabled and record.training:
            key = shape_key(record)
            self.counts[key] = self.counts.get(key, 0) + 1

    def start(self) -> None:
        """Start counting a fresh step."""
        self.counts = {}
        self.enabled = True

    def stop(self) -> None:
        self.enabled = False

    def pop(self) -> Comparison:
        """Cost of everything counted since :meth:`start`, then forget it."""
        comp = compare(self.counts, self.scheme)
        self.counts = {}
        return comp

    def pop_logging_output(self) -> Dict[str, float]:
        """:meth:`pop` as ``{"dsq_cost_<field>": value}`` for a fairseq logging output."""
        return {LOG_PREFIX + k: v for k, v in comparison_fields(self.pop()).items()}


def sum_logging_outputs(logging_outputs: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Sum the ``dsq_cost_*`` entries of fairseq logging outputs (tensors or floats)."""
    sums = {}
    for k in LOG_FIELDS:
        total = 0.0
        for log in logging_outputs:
            v = log.get(LOG_PREFIX + k, 0.0)
            total += float(v.item() if torch.is_tensor(v) else v)
        sums[k] = total
    return sums


class CostLedger(nn.Module):
    """Cumulative cost per precision level, as persistent float64 buffers (checkpointed).

    Buffer ``totals``: shape ``[levels, len(LEDGER_FIELDS)]``. Loading a checkpoint without it
    (saved before cost accounting existed) leaves zeros instead of failing; a checkpoint with a
    different number of levels keeps the rows both have.
    """

    def __init__(self, num_levels: int) -> None:
        super().__init__()
        self.register_buffer(
            "totals", torch.zeros(max(1, num_levels), len(LEDGER_FIELDS), dtype=torch.float64)
        )

    # fp16/bf16 conversion of the model must not round the totals: keep the dtype, move device.
    def _apply(self, fn, recurse=True):  # type: ignore[override]
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(device=fn(buf).device)
        return self

    def _load_from_state_dict(  # noqa: D401 - torch hook
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ):
        key = prefix + "totals"
        if key not in state_dict:
            logger.info("DSQ cost: checkpoint has no %s; cost totals start at zero", key)
            return
        saved = state_dict[key].to(dtype=torch.float64, device=self.totals.device)
        if saved.shape == self.totals.shape:
            self.totals.copy_(saved)
            return
        rows = min(saved.shape[0], self.totals.shape[0])
        cols = min(saved.shape[1], self.totals.shape[1]) if saved.dim() == 2 else 0
        self.totals.zero_()
        if cols:
            self.totals[:rows, :cols].copy_(saved[:rows, :cols])
        logger.warning(
            "DSQ cost: checkpoint %s has shape %s, model has %s; kept the common part",
            key, tuple(saved.shape), tuple(self.totals.shape),
        )

    @property
    def num_levels(self) -> int:
        return int(self.totals.shape[0])

    def add(self, level: int, values: Dict[str, float], updates: int = 1) -> None:
        """Add one update's (all-reduced) :data:`LOG_FIELDS` sums to ``level``'s row."""
        level = min(max(level, 0), self.num_levels - 1)
        row = [float(updates)] + [float(values.get(k, 0.0)) for k in LOG_FIELDS]
        self.totals[level] += torch.tensor(row, dtype=torch.float64, device=self.totals.device)

    def level_values(self, level: int) -> Dict[str, float]:
        return dict(zip(LEDGER_FIELDS, self.totals[level].tolist()))

    def total_values(self) -> Dict[str, float]:
        return dict(zip(LEDGER_FIELDS, self.totals.sum(0).tolist()))

    def has_data(self) -> bool:
        return bool(self.totals[:, LEDGER_FIELDS.index("macs")].sum().item() > 0)

    def metrics(self) -> Dict[str, float]:
        """The cumulative :data:`METRICS` (``dsq_arith_rel`` ...)."""
        rel = field_ratios(self.total_values())
        return {metric: rel[key] for metric, key in METRICS.items()}


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _summary(values: Dict[str, float]) -> Dict[str, Any]:
    out: Dict[str, Any] = dict(values)
    rel = field_ratios(values)
    out.update(rel)
    for kind in ("arith", "dram"):
        r = rel[f"{kind}_vs_fixed16"]
        out[f"{kind}_reduction_vs_fixed16"] = 1.0 / r if r and math.isfinite(r) else None
    return out


def cost_report(
    ledger: CostLedger,
    levels: Sequence[Precision],
    scheme: QuantScheme,
    history: List[Dict[str, Any]],
    num_updates: Optional[int] = None,
) -> Dict[str, Any]:
    """The content of ``dsq_cost.json`` (see ``docs/cost_model.md`` for every key)."""
    total = _summary(ledger.total_values())
    per_level = []
    for i in range(ledger.num_levels):
        entry: Dict[str, Any] = {
            "level": i, "precision": str(levels[i]) if i < len(levels) else None,
        }
        entry.update(_summary(ledger.level_values(i)))
        per_level.append(entry)
    report: Dict[str, Any] = {
        "version": 1,
        "source": "per-run accounting (dsq_translation task)",
        "num_updates": num_updates,
        "scheme": {
            "format": scheme.format, "block_size": scheme.block_size,
            "exponent_bits": scheme.exponent_bits, "int_granularity": scheme.int_granularity,
        },
        "schedule": [str(p) for p in levels],
        "units": {
            "macs": "multiply-accumulates of every GEMM run (forward + both backward GEMMs)",
            "arith": "Fixed32-MAC equivalents (full-adder cells / 1024)",
            "dram": "bits read + written",
            "reference": f"Fixed({coefficients.REFERENCE_WIDTH}) on the same shapes = 1.0",
        },
    }
    for key in ("arith_vs_fixed32", "dram_vs_fixed32", "arith_vs_fixed16", "dram_vs_fixed16"):
        report[key] = total[key]
    report["totals"] = total
    report["levels"] = per_level
    report["history"] = history
    return _clean(report)


def write_json(path: str, content: Dict[str, Any]) -> None:
    """Write ``content`` to ``path`` atomically (a reader never sees a half-written file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".dsq_cost.", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_history(path: str, up_to_update: Optional[int]) -> List[Dict[str, Any]]:
    """Validation history of an existing ``dsq_cost.json`` (for a resumed run), entries after
    ``up_to_update`` dropped (they belong to a run continued from an earlier checkpoint)."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return []
    history = [h for h in old.get("history", []) if isinstance(h, dict)]
    if up_to_update is not None:
        history = [h for h in history if (h.get("num_updates") or 0) <= up_to_update]
    return history


class _StepCost:
    """What :meth:`RunCostTracker.counting` yields: the step's cost, once the step is over."""

    def __init__(self, accountant: Optional[CostAccountant]) -> None:
        self._accountant = accountant

    def logging_output(self) -> Dict[str, float]:
        if self._accountant is None:
            return {}
        return self._accountant.pop_logging_output()


class RunCostTracker:
    """The task's cost accounting: accountant, ledger, validation history, ``dsq_cost.json``.

    ``cfg`` is the task config; its ``save_dir`` / ``no_save`` (mirrors of ``--save-dir`` /
    ``--no-save``) decide where (whether) the JSON is written. Without :meth:`attach` (a model
    without a DSQ runtime) every method does nothing.
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.accountant: Optional[CostAccountant] = None
        self.ledger: Optional[CostLedger] = None
        self.schedule = None
        self.scheme: Optional[QuantScheme] = None
        self.history: Optional[List[Dict[str, Any]]] = None
        self.num_updates: Optional[int] = None

    def attach(self, model: nn.Module) -> None:
        """Observe ``model``'s DSQ GEMMs and give it the ``dsq_cost`` ledger submodule."""
        runtime = getattr(model, "dsq_runtime", None)
        schedule = getattr(model, "dsq_schedule", None)
        if runtime is None or schedule is None:
            return
        self.schedule, self.scheme = schedule, runtime.scheme
        self.accountant = CostAccountant(runtime.scheme)
        runtime.observers.append(self.accountant)
        ledger = getattr(model, "dsq_cost", None)
        if not isinstance(ledger, CostLedger):  # the model normally brings its own
            ledger = model.dsq_cost = CostLedger(len(schedule.levels))
        self.ledger = ledger

    @contextlib.contextmanager
    def counting(self, update_num: int) -> Iterator[_StepCost]:
        """Count the GEMMs of one ``train_step`` (forward and backward)."""
        accountant = self.accountant
        if accountant is None:
            yield _StepCost(None)
            return
        accountant.start()
        try:
            yield _StepCost(accountant)
        finally:
            accountant.stop()
        self.num_updates = int(update_num) + 1

    def reduce_metrics(self, logging_outputs: Sequence[Dict[str, Any]]) -> None:
        """Add a training update's all-reduced cost to the ledger; log the cumulative metrics."""
        ledger = self.ledger
        if ledger is None:
            return
        sums = sum_logging_outputs(logging_outputs)
        if sums["macs"] > 0:  # a training update (validation outputs carry no cost)
            ledger.add(self.schedule.level_index, sums)
        if ledger.has_data():
            for key, value in ledger.metrics().items():
                metrics.log_scalar(key, value, weight=0, round=4)

    # -------------------------------------------------------------------- dsq_cost.json

    def json_path(self) -> Optional[str]:
        """``<save-dir>/dsq_cost.json`` on rank 0, ``None`` elsewhere or with ``--no-save``."""
        save_dir = getattr(self.cfg, "save_dir", None)
        if not save_dir or bool(getattr(self.cfg, "no_save", False)):
            return None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return None
        return os.path.join(str(save_dir), COST_JSON)

    def _history(self, up_to_update: Optional[int]) -> List[Dict[str, Any]]:
        if self.history is None:  # first use in this process: continue a resumed run's file
            path = self.json_path()
            self.history = read_history(path, up_to_update) if path else []
        return self.history

    def record_validation(self, num_updates: int, loss: float, level: int, next_level: int):
        """One validation round (first subset only): history entry, then rewrite the JSON."""
        if self.ledger is None:
            return
        self.num_updates = num_updates
        history = self._history(num_updates)
        if history and history[-1].get("num_updates") == num_updates:
            return  # a further validation subset of the same round
        entry: Dict[str, Any] = {
            "num_updates": num_updates, "valid_loss": loss, "level": level,
            "precision": str(self.schedule.levels[level]), "next_level": next_level,
        }
        if self.ledger.has_data():
            entry.update(self.ledger.metrics())
        history.append(entry)
        self.write_json()

    def write_json(self) -> Optional[str]:
        """Write ``dsq_cost.json`` now; returns its path (``None`` when not written)."""
        path = self.json_path()
        if path is None or self.ledger is None:
            return None
        report = cost_report(
            self.ledger, self.schedule.levels, self.scheme, self._history(self.num_updates),
            self.num_updates,
        )
        try:
            write_json(path, report)
        except OSError as e:  # never stop training for a report
            logger.warning("DSQ cost: could not write %s: %s", path, e)
            return None
        return path


__all__ = [
    "COST_JSON",
    "RunCostTracker",
    "LEDGER_FIELDS",
    "LOG_FIELDS",
    "METRICS",
    "CostAccountant",
    "CostLedger",
    "comparison_fields",
    "cost_report",
    "field_ratios",
    "read_history",
    "sum_logging_outputs",
    "write_json",
]
