"""Age bands of the open data: ``-64``, ``65-`` (age on the day of the dose is 65 or more), ``UNK``."""

from __future__ import annotations

from datetime import date, timedelta
from enum import StrEnum


class AgeBand(StrEnum):
    UNDER_65 = "-64"
    SIXTY_FIVE_PLUS = "65-"
    UNKNOWN = "UNK"


def age_on(birth_date: date, on: date) -> int:
    """Age in whole years on ``on``, counted as Japanese law counts it.

    年齢計算ニ関スル法律: a year of age is completed at the end of the day before the birthday, so a
    person is one year older from their birthday's eve on; someone born on 29 February ages on 28
    February in common years.
    """
    day_after = on + timedelta(days=1)
    years = day_after.year - birth_date.year
    if (day_after.month, day_after.day) < (birth_date.month, birth_date.day):
        years -= 1
    return years


def age_band(birth_date: date | None, on: date) -> AgeBand:
    if birth_date is None:
        return AgeBand.UNKNOWN
    return AgeBand.SIXTY_FIVE_PLUS if age_on(birth_date, on) >= 65 else AgeBand.UNDER_65
