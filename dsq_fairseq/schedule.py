"""The time-adaptive precision schedule (DESIGN.md §3), kept as model buffers.

Why buffers: fairseq's ``Trainer.load_checkpoint`` (the ``fairseq-train`` resume path) restores the
model but never gives ``task_state`` back, so state held by the task would be lost on resume.
Buffers travel with every checkpoint, are restored with the model, and are identical on all
distributed ranks because every rank feeds the same all-reduced validation loss.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from dsq_fairseq.precision import DSQConfigError, Precision

logger = logging.getLogger(__name__)


class PrecisionSchedule(nn.Module):
    """Plateau schedule over ``levels`` (lowest first).

    After each validation round :meth:`observe` compares the validation loss with the best seen
    at the current level; when it has not improved by more than ``min_delta`` for ``patience``
    consecutive rounds the level rises by one (never down), the count resets and the best loss
    is forgotten. ``on_change(precision)`` is called whenever the level in force changes,
    including when a checkpoint is loaded.

    Buffers (all persistent): ``level`` (int64, index into ``levels``), ``bad_rounds`` (int64),
    ``best_loss`` (float64, ``inf`` until the first round at a level), ``last_update`` (int64,
    the update count of the last observed round, so several validation subsets at one update
    count once).
    """

    def __init__(
        self,
        levels: Sequence[Precision],
        patience: int = 5,
        min_delta: float = 0.0,
        on_change: Optional[Callable[[Precision], None]] = None,
    ) -> None:
        super().__init__()
        if not levels:
            raise DSQConfigError("--dsq-schedule: at least one level is required")
        if not isinstance(patience, int) or patience < 1:
            raise DSQConfigError(f"--dsq-patience: {patience!r} is not allowed; it must be >= 1")
        if not math.isfinite(min_delta) or min_delta < 0:
            raise DSQConfigError(
                f"--dsq-min-delta: {min_delta!r} is not allowed; it must be a finite number >= 0"
            )
        self.levels: List[Precision] = list(levels)
        self.patience = patience
        self.min_delta = min_delta
        self._on_change = on_change
        self.register_buffer("level", torch.zeros((), dtype=torch.long))
        self.register_buffer("bad_rounds", torch.zeros((), dtype=torch.long))
        self.register_buffer("best_loss", torch.full((), math.inf, dtype=torch.float64))
        self.register_buffer("last_update", torch.full((), -1, dtype=torch.long))
        self.register_load_state_dict_post_hook(lambda module, _keys: module._announce())

    # fp16/bf16 conversion of the model must not round the best loss: keep buffer dtypes.
    def _apply(self, fn, recurse=True):  # type: ignore[override]
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(device=fn(buf).device)
        return self

    @property
    def level_index(self) -> int:
        return int(self.level.item())

    @property
    def precision(self) -> Precision:
        return self.levels[min(self.level_index, len(self.levels) - 1)]

    def _announce(self) -> None:
        if self.level_index >= len(self.levels):
            raise DSQConfigError(
                f"--dsq-schedule: the checkpoint is at level {self.level_index + 1} but the "
                f"schedule has only {len(self.levels)} level(s)"
            )
        if self._on_change is not None:
            self._on_change(self.precision)

    def observe(self, valid_loss: float, num_updates: int) -> bool:
        """Feed one validation round; returns True when the level rose."""
        if num_updates == int(self.last_update.item()):
            return False
        self.last_update.fill_(num_updates)
        if valid_loss < float(self.best_loss.item()) - self.min_delta:
            self.best_loss.fill_(valid_loss)
            self.bad_rounds.zero_()
            return False
        self.bad_rounds.add_(1)
        if int(self.bad_rounds.item()) < self.patience or self.level_index + 1 >= len(self.levels):
            return False
        old = self.precision
        self.level.add_(1)
        self.bad_rounds.zero_()
        self.best_loss.fill_(math.inf)
        logger.info(
            "DSQ: validation loss %.4f has not improved for %d round(s); precision level "
            "%d -> %d, [%s] -> [%s] after update %d",
            valid_loss, self.patience, self.level_index - 1, self.level_index, old,
            self.precision, num_updates,
        )
        self._announce()
        return True
