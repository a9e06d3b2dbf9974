"""``dsq_translation``: fairseq's ``translation`` task driving the DSQ precision schedule."""


import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from fairseq import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from dsq_fairseq.precision import DSQConfigError
from dsq_fairseq.schedule import PrecisionSchedule
from dsq_fairseq.tasks import rank_trace

logger = logging.getLogger(__name__)


@dataclass
class DSQTranslationConfig(TranslationConfig):
    """``translation`` plus a per-rank trace; the ``--dsq-*`` format options are the model's."""

    dsq_trace_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "if set, every rank appends each validation round (update, valid loss, level, "
            "parameter SHA-256) to DIR/dsq_trace_rank{R}.jsonl"
        },
    )


def precision_metrics(schedule: PrecisionSchedule) -> Dict[str, int]:
    """What the logs show of the level in force: index, stash width and every q point."""
    p = schedule.precision
    return {
        "dsq_level": schedule.level_index,
        "dsq_bits": p.q1,
        "dsq_q0": p.q0,
        "dsq_q1": p.q1,
        "dsq_q2": p.q2,
        "dsq_q3": p.q3,
    }


@register_task("dsq_translation", dataclass=DSQTranslationConfig)
class DSQTranslationTask(TranslationTask):
    """Translation whose model is a ``dsq_transformer``; adds the plateau precision schedule.

    After every validation round fairseq calls :meth:`post_validate` with the all-reduced
    validation loss (the number logged as ``valid | loss``); the model's schedule decides whether
    the level rises. Train and valid logs carry ``dsq_level`` (0-based), ``dsq_bits`` (the stash
    width q1) and ``dsq_q0..dsq_q3``.
    """

    def __init__(self, cfg: DSQTranslationConfig, src_dict, tgt_dict) -> None:
        super().__init__(cfg, src_dict, tgt_dict)
        self._schedule: Optional[PrecisionSchedule] = None

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        schedule = getattr(model, "dsq_schedule", None)
        if not isinstance(schedule, PrecisionSchedule):
            raise DSQConfigError(
                "--task dsq_translation: the model has no DSQ precision schedule; use --arch "
                "dsq_transformer, dsq_transformer_iwslt_de_en, dsq_transformer_wmt_en_de, "
                "dsq_transformer_vaswani_wmt_en_de_big or dsq_transformer_demo"
            )
        self._schedule = schedule
        return model

    def reduce_metrics(self, logging_outputs, criterion) -> None:
        super().reduce_metrics(logging_outputs, criterion)
        if self._schedule is not None:
            for key, value in precision_metrics(self._schedule).items():
                metrics.log_scalar(key, value, weight=0, round=0)

    def post_validate(self, model, stats: Dict[str, Any], agg) -> None:
        schedule = getattr(model, "dsq_schedule", None)
        if schedule is None or "loss" not in stats:
            return
        num_updates = int(stats.get("num_updates", 0))
        schedule.observe(float(stats["loss"]), num_updates)
        stats["dsq_next_level"] = schedule.level_index
        if self.cfg.dsq_trace_dir:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            rank_trace.append_round(self.cfg.dsq_trace_dir, rank, {
                "num_updates": num_updates, "valid_loss": float(stats["loss"]),
                "level": schedule.level_index, "params_sha256": rank_trace.parameter_digest(model),
            })
