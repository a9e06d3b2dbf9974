"""Parsing and validation of precision levels and the format family."""

import pytest

from dsq_fairseq.precision import DSQConfigError, Precision, QuantScheme, parse_schedule


def test_parse_schedule_levels_lowest_first():
    assert parse_schedule("2,2,2,16;16,4,4,16") == [Precision(2, 2, 2, 16), Precision(16, 4, 4, 16)]
    assert parse_schedule(" 16, 4, 4, fp32 ") == [Precision(16, 4, 4, 32)]
    assert parse_schedule("8,8,8,8;") == [Precision(8, 8, 8, 8)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty schedule"),
        ("16,4,4", "exactly 4"),
        ("16,4,4,16,16", "exactly 4"),
        ("16,,4,16", "exactly 4"),
        ("16,4,x,16", "not a bit width"),
        ("16,4,1,16", r"out of range; allowed: 2\.\.32"),
        ("16,4,4,33", r"out of range; allowed: 2\.\.32"),
        ("16,4,4,16;2,2,2,16", "goes below"),
        ("16,4,4,16:2,2,2,16", "exactly 4|not a bit width"),
    ],
)
def test_bad_schedules_name_the_flag(text, message):
    with pytest.raises(DSQConfigError, match="--dsq-schedule") as info:
        parse_schedule(text)
    assert info.match(message)


@pytest.mark.parametrize(
    "kwargs, flag, allowed",
    [
        ({"format": "mxfp9"}, "--dsq-format", "bfp, fixed, int, none"),
        ({"rounding": "up"}, "--dsq-rounding", "nearest, stochastic"),
        ({"int_granularity": "row"}, "--dsq-int-granularity", "tensor, channel, token"),
        ({"block_size": 0}, "--dsq-block-size", ">= 1"),
        ({"exponent_bits": 1}, "--dsq-exponent-bits", r"2\.\.8"),
        ({"exponent_bits": 9}, "--dsq-exponent-bits", r"2\.\.8"),
    ],
)
def test_bad_scheme_options_name_flag_and_allowed_values(kwargs, flag, allowed):
    with pytest.raises(DSQConfigError, match=flag) as info:
        QuantScheme(**kwargs)
    assert info.match(allowed)
