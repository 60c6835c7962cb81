from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.domain.period import BOUND_FORMAT, kept_since, period_bound


@pytest.mark.parametrize(
    ("value", "end", "instant"),
    [
        # A date is a whole Japanese day: from midnight in Japan, 15:00 UTC the day before ...
        ("2026-11-27", False, datetime(2026, 11, 26, 15, tzinfo=UTC)),
        # ... up to the next day's midnight in Japan (to includes its day).
        ("2026-11-27", True, datetime(2026, 11, 27, 15, tzinfo=UTC)),
        ("2026-12-31", True, datetime(2026, 12, 31, 15, tzinfo=UTC)),  # across a year's end
        ("9999-12-31", True, datetime.max.replace(tzinfo=UTC)),  # no next day: the end of time
        ("0001-01-01", False, datetime.min.replace(tzinfo=UTC)),  # its midnight in Japan is before year 1 in UTC
        ("2026-11-27T10:00:00+09:00", False, datetime(2026, 11, 27, 1, tzinfo=UTC)),  # in UTC, for SQLite
        ("2026-11-27T10:00:00+09:00", True, datetime(2026, 11, 27, 1, tzinfo=UTC)),  # a moment is one moment
        ("2026-11-27T01:00:00Z", False, datetime(2026, 11, 27, 1, tzinfo=UTC)),
        ("2026-11-27T10:00:00", False, datetime(2026, 11, 27, 1, tzinfo=UTC)),  # no zone: Japan's time
        ("0001-01-01T00:00:00+09:00", False, datetime.min.replace(tzinfo=UTC)),  # before year 1 in UTC
        ("9999-12-31T23:00:00-05:00", True, datetime.max.replace(tzinfo=UTC)),  # after 9999 in UTC
    ],
)
def test_a_bound_is_an_instant_in_utc(value: str, end: bool, instant: datetime) -> None:
    bound = period_bound(value, end=end)
    assert bound == instant and bound.tzinfo is UTC


@pytest.mark.parametrize(
    "value", ["yesterday", "2026-13-01", "2026-02-30", "2026-11-27T25:00", "20261127", "2026-11-27 x", ""]
)
def test_anything_else_is_refused_with_the_format(value: str) -> None:
    with pytest.raises(ValueError, match=BOUND_FORMAT):
        period_bound(value, end=False)


@pytest.mark.parametrize(
    ("now", "years", "since"),
    [
        # 10:00 in Japan on 28 November 2026: kept from midnight in Japan on 28 November 2019.
        (datetime(2026, 11, 28, 1, tzinfo=UTC), 7, datetime(2019, 11, 27, 15, tzinfo=UTC)),
        # 23:30 UTC on 27 November is already the 28th in Japan.
        (datetime(2026, 11, 27, 23, 30, tzinfo=UTC), 7, datetime(2019, 11, 27, 15, tzinfo=UTC)),
        # 14:59 UTC on the 28th is still the 28th in Japan; at 15:00 the 29th begins.
        (datetime(2026, 11, 28, 14, 59, tzinfo=UTC), 7, datetime(2019, 11, 27, 15, tzinfo=UTC)),
        (datetime(2026, 11, 28, 15, 0, tzinfo=UTC), 7, datetime(2019, 11, 28, 15, tzinfo=UTC)),
        # 29 February in Japan, seven years back: no such day, so the 28th (a day more kept).
        (datetime(2028, 2, 29, 3, tzinfo=UTC), 7, datetime(2021, 2, 27, 15, tzinfo=UTC)),
        # ... and eight years back there is one.
        (datetime(2028, 2, 29, 3, tzinfo=UTC), 8, datetime(2020, 2, 28, 15, tzinfo=UTC)),
    ],
)
def test_records_are_kept_from_midnight_in_japan_years_before(now: datetime, years: int, since: datetime) -> None:
    assert kept_since(now, years) == since
