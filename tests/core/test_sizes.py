"""Sizes such as `max_shard_size` and `--shard-size`: a string names its unit, an int is bytes."""

from __future__ import annotations

import pytest

from opt_core.formats.files import parse_size


@pytest.mark.parametrize("text, expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 1024**3), ("1.5MiB", 3 * 1024**2 // 2),
    (" 20kb ", 20_000), ("800B", 800), (20_000, 20_000),
])
def test_sizes_with_units_and_byte_counts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, message", [
    ("10", r"no unit|give a number with a unit.*did you mean '10MB' or '10GB'"),
    ("2.5", r"did you mean '2.5MB'"),
    ("GB", "give a number with a unit"),
    ("-1GB", "positive"),
    ("0MB", "positive"),
    ("infGB", "positive"),
    (0, "positive"),
    (True, "integer byte count"),
    (2.5, "integer byte count"),
])
def test_sizes_without_a_unit_or_not_positive_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_size(text)
