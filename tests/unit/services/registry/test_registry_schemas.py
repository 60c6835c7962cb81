"""A resident's birth date is judged by Japan's day, as the CSV import judges it, whatever the server's zone."""

from __future__ import annotations

from datetime import UTC, date, datetime, tzinfo

import pytest
from pydantic import ValidationError

from services.registry.schemas import ResidentIn
from shared.domain import japan_time


def at(instant: datetime) -> type[datetime]:
    class Clock(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Clock:
            return instant.astimezone(tz)  # type: ignore[return-value]

    return Clock


@pytest.mark.parametrize(
    ("now", "birth_date", "accepted"),
    [
        # 00:30 in Japan, still the day before in UTC: born today in Japan is not the future...
        (datetime(2026, 11, 25, 15, 30, tzinfo=UTC), date(2026, 11, 26), True),
        (datetime(2026, 11, 25, 15, 30, tzinfo=UTC), date(2026, 11, 27), False),
        # ...and at 23:59:59 in Japan tomorrow is still refused, though UTC's day is already that day's.
        (datetime(2026, 11, 26, 14, 59, 59, tzinfo=UTC), date(2026, 11, 26), True),
        (datetime(2026, 11, 26, 14, 59, 59, tzinfo=UTC), date(2026, 11, 27), False),
        (datetime(2026, 11, 26, 15, 0, tzinfo=UTC), date(2026, 11, 27), True),  # midnight in Japan
    ],
)
def test_a_birth_date_in_the_future_is_judged_by_japans_day(
    now: datetime, birth_date: date, accepted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(japan_time, "datetime", at(now))
    body = {"name": "山田 太郎", "name_kana": "ヤマダ タロウ", "sex": "M", "birth_date": birth_date.isoformat()}
    if accepted:
        assert ResidentIn.model_validate(body).birth_date == birth_date
    else:
        with pytest.raises(ValidationError) as refused:
            ResidentIn.model_validate(body)
        [error] = refused.value.errors()
        assert error["loc"] == ("birth_date",) and "in the future" in error["msg"]
