"""``dsq_translation``: fairseq's ``translation`` task driving the DSQ precision schedule."""


import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from fairseq import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from dsq_fairseq import heap
from dsq_fairseq.cost.accounting import RunCostTracker
from dsq_fairseq.errors import user_errors_exit_cleanly
from dsq_fairseq.nn import weight_cache
from dsq_fairseq.precision import DSQConfigError
from dsq_fairseq.schedule import PrecisionSchedule
from dsq_fairseq.tasks import rank_trace

logger = logging.getLogger(__name__)


@dataclass
class DSQTranslationConfig(TranslationConfig):
    """``translation`` plus a per-rank trace; the ``--dsq-*`` format options are the model's.

    ``save_dir`` / ``no_save`` are no options of their own: they mirror ``--save-dir`` /
    ``--no-save`` (hydra interpolation) so the task knows where to write ``dsq_cost.json``.
    """

    save_dir: str = II("checkpoint.save_dir")
    no_save: bool = II("checkpoint.no_save")

    dsq_trace_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "if set, every rank appends each validation round (update, valid loss, level, "
            "parameter SHA-256) to DIR/dsq_trace_rank{R}.jsonl"
        },
    )
    dsq_no_heap_reuse: bool = field(
        default=False,
        metadata={
            "help": "leave glibc's malloc as it is; by default the task keeps freed host memory "
            "in the heap for reuse (mmap and trim thresholds 1 GiB, dsq_fairseq/heap.py), so "
            "DSQ's tensor-sized temporaries don't page-fault on every allocation; the process "
            "then keeps its peak heap mapped. No effect outside glibc"
        },
    )


def precision_metrics(schedule: PrecisionSchedule) -> Dict[str, int]:
    """What the logs show of the level in force: index, stash width and every q point (as bits
    per element: an MX point logs its element bits, so every value is a number)."""
    q0, q1, q2, q3 = schedule.precision.bits
    return {
        "dsq_level": schedule.level_index,
        "dsq_bits": q1,
        "dsq_q0": q0,
        "dsq_q1": q1,
        "dsq_q2": q2,
        "dsq_q3": q3,
    }


@register_task("dsq_translation", dataclass=DSQTranslationConfig)
class DSQTranslationTask(TranslationTask):
    """Translation whose model is a ``dsq_transformer``; adds the plateau precision schedule.

    After every validation round fairseq calls :meth:`post_validate` with the all-reduced
    validation loss (the number logged as ``valid | loss``); the model's schedule decides whether
    the level rises. Train and valid logs carry ``dsq_level`` (0-based), ``dsq_bits`` (the stash
    width q1) and ``dsq_q0..dsq_q3``.

    Cost accounting (``docs/cost_model.md``): every ``train_step`` counts the DSQ GEMMs that ran
    (forward and backward, at the precision in force) and puts their cost into the logging
    output; :meth:`reduce_metrics` adds the all-reduced sums to the model's ``dsq_cost`` ledger
    (checkpointed buffers) and logs the cumulative ``dsq_arith_rel`` / ``dsq_dram_rel`` (vs
    Fixed32) and ``dsq_arith_vs_fixed16`` / ``dsq_dram_vs_fixed16``. ``<save-dir>/dsq_cost.json``
    is rewritten after every validation round and every checkpoint save (not with
    ``--no-save``).
    """

    def __init__(self, cfg: DSQTranslationConfig, src_dict, tgt_dict) -> None:
        super().__init__(cfg, src_dict, tgt_dict)
        if not cfg.dsq_no_heap_reuse:
            heap.reuse_freed_memory()
        self._schedule: Optional[PrecisionSchedule] = None
        self._cost = RunCostTracker(cfg)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        schedule = getattr(model, "dsq_schedule", None)
        if not isinstance(schedule, PrecisionSchedule):
            with user_errors_exit_cleanly():
                raise DSQConfigError(
                    "--task dsq_translation: the model has no DSQ precision schedule; use --arch "
                    "dsq_transformer, dsq_transformer_iwslt_de_en, dsq_transformer_wmt_en_de, "
                    "dsq_transformer_vaswani_wmt_en_de_big or dsq_transformer_demo"
                )
        self._schedule = schedule
        self._cost.attach(model)
        return model

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self._begin_weight_state(model, ("train", update_num))
        self._last_update = update_num
        with self._cost.counting(update_num) as cost:
            loss, sample_size, logging_output = super().train_step(
                sample, model, criterion, optimizer, update_num, ignore_grad
            )
        logging_output.update(cost.logging_output())
        return loss, sample_size, logging_output

    def valid_step(self, sample, model, criterion):
        self._begin_weight_state(model, ("valid", getattr(self, "_last_update", None)))
        return super().valid_step(sample, model, criterion)

    @staticmethod
    def _begin_weight_state(model, update_token) -> None:
        """Tell the q0 weight cache (:mod:`dsq_fairseq.nn.weight_cache`) which weight state the
        next forwards see: one token per update for training (all micro-batches of an update share
        the weights), one per validation round (after the last update)."""
        runtime = getattr(model, "dsq_runtime", None)
        if runtime is not None:
            weight_cache.begin(runtime, update_token)

    def state_dict(self):
        self._cost.write_json()  # fairseq saves the task state with every checkpoint
        return super().state_dict()

    def reduce_metrics(self, logging_outputs, criterion) -> None:
        super().reduce_metrics(logging_outputs, criterion)
        if self._schedule is not None:
            for key, value in precision_metrics(self._schedule).items():
                metrics.log_scalar(key, value, weight=0, round=0)
        self._cost.reduce_metrics(logging_outputs)

    def post_validate(self, model, stats: Dict[str, Any], agg) -> None:
        schedule = getattr(model, "dsq_schedule", None)
        if schedule is None or "loss" not in stats:
            return
        num_updates = int(stats.get("num_updates", 0))
        level = schedule.level_index
        schedule.observe(float(stats["loss"]), num_updates)
        stats["dsq_next_level"] = schedule.level_index
        self._cost.record_validation(num_updates, float(stats["loss"]), level, schedule.level_index)
        if self.cfg.dsq_trace_dir:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            rank_trace.append_round(self.cfg.dsq_trace_dir, rank, {
                "num_updates": num_updates, "valid_loss": float(stats["loss"]),
                "level": schedule.level_index, "params_sha256": rank_trace.parameter_digest(model),
            })
