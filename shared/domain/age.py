"""Age bands: the open data's ``-64``, ``65-`` (age on the day of the dose is 65 or more), ``UNK``; and the
dashboard's 10-year bands (``0-9`` … ``80-89``, ``90-``, ``UNK``), both from the age on the day of the dose."""

from __future__ import annotations

from datetime import date, timedelta
from enum import StrEnum


class AgeBand(StrEnum):
    UNDER_65 = "-64"
    SIXTY_FIVE_PLUS = "65-"
    UNKNOWN = "UNK"


class AgeBand10(StrEnum):
    """10-year age bands, as the 住民基本台帳 population tables' 5-year bands pair up (0–4 and 5–9, …), with
    everyone 90 or older in one band (90–94, 95–99 and 100+ together). Values are what the API returns;
    the dashboard shows them as 10歳未満, 10代 … 80代, 90歳以上, 不明 (see :data:`AGE_BAND_10_LABELS`)."""

    AGE_0_9 = "0-9"
    AGE_10_19 = "10-19"
    AGE_20_29 = "20-29"
    AGE_30_39 = "30-39"
    AGE_40_49 = "40-49"
    AGE_50_59 = "50-59"
    AGE_60_69 = "60-69"
    AGE_70_79 = "70-79"
    AGE_80_89 = "80-89"
    AGE_90_PLUS = "90-"
    UNKNOWN = "UNK"


AGE_BAND_10_LABELS: dict[AgeBand10, str] = {
    AgeBand10.AGE_0_9: "10歳未満",
    **{band: f"{band.value.split('-')[0]}代" for band in list(AgeBand10)[1:9]},
    AgeBand10.AGE_90_PLUS: "90歳以上",
    AgeBand10.UNKNOWN: "不明",
}

_DECADES = list(AgeBand10)[:10]


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


def age_band_10(birth_date: date | None, on: date) -> AgeBand10:
    """The 10-year band of the age on ``on`` (the same age as :func:`age_band`'s); unknown without a birth date.

    A birth date after ``on`` (a dose dated before the recorded birth: a data error somewhere) is unknown
    rather than a negative age.
    """
    if birth_date is None:
        return AgeBand10.UNKNOWN
    age = age_on(birth_date, on)
    if age < 0:
        return AgeBand10.UNKNOWN
    return _DECADES[min(age // 10, 9)]
