from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.domain.period import BOUND_FORMAT, period_bound


@pytest.mark.parametrize(
    ("value", "end", "instant"),
    [
        ("2026-11-27", False, datetime(2026, 11, 27, tzinfo=UTC)),  # a date: its whole UTC day ...
        ("2026-11-27", True, datetime(2026, 11, 28, tzinfo=UTC)),  # ... up to the next day's start
        ("9999-12-31", True, datetime.max.replace(tzinfo=UTC)),  # no next day: the end of time
        ("2026-11-27T10:00:00+09:00", False, datetime(2026, 11, 27, 1, tzinfo=UTC)),  # in UTC, for SQLite
        ("2026-11-27T10:00:00+09:00", True, datetime(2026, 11, 27, 1, tzinfo=UTC)),  # a moment is one moment
        ("2026-11-27T10:00:00", False, datetime(2026, 11, 27, 10, tzinfo=UTC)),  # no zone: UTC
    ],
)
def test_a_bound_is_an_instant_in_utc(value: str, end: bool, instant: datetime) -> None:
    bound = period_bound(value, end=end)
    assert bound == instant and bound.tzinfo is UTC


@pytest.mark.parametrize("value", ["yesterday", "2026-13-01", "2026-11-27T25:00", "0001-01-01T00:00:00+09:00", ""])
def test_anything_else_is_refused_with_the_format(value: str) -> None:
    with pytest.raises(ValueError, match=BOUND_FORMAT):
        period_bound(value, end=False)
