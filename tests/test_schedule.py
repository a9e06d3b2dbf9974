"""The plateau schedule (DESIGN.md §3) on hand-made loss sequences."""

import math

import pytest
import torch

from dsq_fairseq.precision import DSQConfigError, Precision, parse_schedule
from dsq_fairseq.schedule import PrecisionSchedule

LEVELS = parse_schedule("2,2,2,16;8,4,4,16;16,4,4,16")


def feed(schedule, losses, start=1):
    return [schedule.observe(loss, num_updates=start + i) for i, loss in enumerate(losses)]


def test_rises_after_patience_rounds_without_improvement_and_resets():
    s = PrecisionSchedule(LEVELS, patience=2)
    # best 5.0, then two rounds without improvement -> level 1; best is forgotten there
    assert feed(s, [5.0, 5.1, 5.0]) == [False, False, True]
    assert s.level_index == 1 and s.precision == Precision(8, 4, 4, 16)
    assert int(s.bad_rounds) == 0 and math.isinf(float(s.best_loss))
    # at the new level a worse loss than before still counts as the level's first best
    assert feed(s, [6.0, 5.5, 5.6, 5.6], start=10) == [False, False, False, True]
    assert s.level_index == 2


def test_improvement_resets_the_count():
    s = PrecisionSchedule(LEVELS, patience=2)
    assert feed(s, [5.0, 5.2, 4.9, 5.0, 4.8, 4.9]) == [False] * 6
    assert s.level_index == 0


def test_min_delta_improvements_too_small_do_not_count():
    s = PrecisionSchedule(LEVELS, patience=2, min_delta=0.1)
    assert feed(s, [5.0, 4.95, 4.91]) == [False, False, True]


def test_never_goes_past_the_last_level_and_never_down():
    s = PrecisionSchedule(LEVELS, patience=1)
    feed(s, [1.0] * 20)
    assert s.level_index == 2


def test_one_observation_per_update():
    s = PrecisionSchedule(LEVELS, patience=1)
    assert s.observe(5.0, 7) is False
    assert s.observe(9.0, 7) is False  # a second valid subset at the same update is ignored
    assert s.observe(9.0, 8) is True


def test_state_dict_roundtrip_restores_level_count_and_best_and_announces():
    s = PrecisionSchedule(LEVELS, patience=3)
    feed(s, [5.0, 5.0, 5.0, 5.0, 4.0, 4.5])
    seen = []
    t = PrecisionSchedule(LEVELS, patience=3, on_change=seen.append)
    t.load_state_dict(s.state_dict())
    assert (t.level_index, int(t.bad_rounds), float(t.best_loss)) == (1, 1, 4.0)
    assert seen == [LEVELS[1]]


def test_half_precision_model_keeps_exact_best_loss():
    s = PrecisionSchedule(LEVELS)
    s.observe(4.123456789, 1)
    s.half()
    assert s.best_loss.dtype == torch.float64 and float(s.best_loss) == 4.123456789


def test_checkpoint_beyond_schedule_is_a_clear_error():
    s = PrecisionSchedule(LEVELS)
    state = s.state_dict()
    state["level"] = torch.tensor(5)
    with pytest.raises(DSQConfigError, match="--dsq-schedule"):
        PrecisionSchedule(LEVELS).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"patience": 0}, "--dsq-patience"), ({"min_delta": -1.0}, "--dsq-min-delta"),
     ({"min_delta": float("nan")}, "--dsq-min-delta")],
)
def test_bad_schedule_options(kwargs, flag):
    with pytest.raises(DSQConfigError, match=flag):
        PrecisionSchedule(LEVELS, **kwargs)
