"""Japan's calendar day: the day turns at midnight JST, 15:00 UTC."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from shared.domain.japan_time import japan_today


@pytest.mark.parametrize(
    ("now", "today"),
    [
        (datetime(2021, 6, 1, 14, 59, 59, tzinfo=UTC), date(2021, 6, 1)),
        (datetime(2021, 6, 1, 15, 0, 0, tzinfo=UTC), date(2021, 6, 2)),  # midnight in Tokyo
        (datetime(2021, 12, 31, 15, 0, tzinfo=UTC), date(2022, 1, 1)),
        (datetime(2021, 6, 1, 23, 59, tzinfo=timezone(timedelta(hours=9))), date(2021, 6, 1)),
        (datetime(2021, 6, 1, 10, 0, tzinfo=timezone(timedelta(hours=-5))), date(2021, 6, 2)),
    ],
)
def test_japan_today_of_an_instant(now: datetime, today: date) -> None:
    assert japan_today(now) == today


def test_japan_today_now() -> None:
    before = japan_today(datetime.now(UTC))
    assert japan_today() in {before, before + timedelta(days=1)}


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        japan_today(datetime(2021, 6, 1, 12, 0))
