"""Age on the day of a dose, as Japanese law counts it, and the open-data age bands."""

from __future__ import annotations

from datetime import date

import pytest

from shared.domain.age import AGE_BAND_10_LABELS, AgeBand, AgeBand10, age_band, age_band_10, age_on


@pytest.mark.parametrize(
    ("born", "on", "age"),
    [
        # 年齢計算ニ関スル法律: a year is completed at the end of the day before the birthday.
        (date(1956, 4, 2), date(2021, 3, 31), 64),
        (date(1956, 4, 2), date(2021, 4, 1), 65),  # birthday eve: already 65
        (date(1956, 4, 2), date(2021, 4, 2), 65),
        (date(1956, 4, 1), date(2021, 3, 31), 65),
        (date(1956, 4, 3), date(2021, 4, 1), 64),
        (date(1956, 4, 3), date(2021, 4, 2), 65),
        (date(2000, 1, 1), date(2020, 12, 31), 21),  # eve across a year end
        (date(2000, 1, 1), date(2020, 12, 30), 20),
        (date(2021, 5, 10), date(2021, 5, 10), 0),
        (date(2020, 5, 10), date(2021, 5, 8), 0),
        (date(2020, 5, 10), date(2021, 5, 9), 1),
        # Born 29 February: ages at the end of 28 February, in common and in leap years alike.
        (date(1956, 2, 29), date(2021, 2, 27), 64),
        (date(1956, 2, 29), date(2021, 2, 28), 65),  # common year
        (date(1956, 2, 29), date(2021, 3, 1), 65),
        (date(1956, 2, 29), date(2020, 2, 27), 63),
        (date(1956, 2, 29), date(2020, 2, 28), 64),  # leap year: eve of 29 February
        (date(1956, 2, 29), date(2020, 2, 29), 64),
        (date(1956, 2, 29), date(2020, 3, 1), 64),
        # Born 1 March: the eve is 29 February in leap years, 28 February otherwise.
        (date(1956, 3, 1), date(2020, 2, 28), 63),
        (date(1956, 3, 1), date(2020, 2, 29), 64),
        (date(1956, 3, 1), date(2021, 2, 28), 65),
    ],
)
def test_age_on(born: date, on: date, age: int) -> None:
    assert age_on(born, on) == age


@pytest.mark.parametrize(
    ("born", "on", "band"),
    [
        (None, date(2021, 4, 12), AgeBand.UNKNOWN),
        (date(1956, 4, 2), date(2021, 3, 31), AgeBand.UNDER_65),
        (date(1956, 4, 2), date(2021, 4, 1), AgeBand.SIXTY_FIVE_PLUS),
        (date(1956, 4, 3), date(2021, 4, 1), AgeBand.UNDER_65),
        (date(1930, 1, 1), date(2021, 4, 12), AgeBand.SIXTY_FIVE_PLUS),
        (date(2005, 6, 1), date(2021, 6, 30), AgeBand.UNDER_65),
        (date(1956, 2, 29), date(2021, 2, 27), AgeBand.UNDER_65),
        (date(1956, 2, 29), date(2021, 2, 28), AgeBand.SIXTY_FIVE_PLUS),
    ],
)
def test_age_band(born: date | None, on: date, band: AgeBand) -> None:
    assert age_band(born, on) is band


@pytest.mark.parametrize(
    ("band", "value"), [(AgeBand.UNDER_65, "-64"), (AgeBand.SIXTY_FIVE_PLUS, "65-"), (AgeBand.UNKNOWN, "UNK")]
)
def test_age_band_values_match_the_open_data(band: AgeBand, value: str) -> None:
    assert band == value
    assert str(band) == value


def _born(years_before: int, on: date) -> date:
    return on.replace(year=on.year - years_before)


@pytest.mark.parametrize(
    ("born", "on", "band"),
    [
        (None, date(2021, 4, 12), AgeBand10.UNKNOWN),
        (date(2021, 6, 30), date(2021, 6, 30), AgeBand10.AGE_0_9),  # born that day
        (date(2021, 7, 2), date(2021, 6, 30), AgeBand10.UNKNOWN),  # dated before the birth: no age
        # Each boundary from both sides: the birthday's eve is the first day of the new age.
        (date(2011, 7, 2), date(2021, 6, 30), AgeBand10.AGE_0_9),  # 10th birthday in two days
        (date(2011, 7, 1), date(2021, 6, 30), AgeBand10.AGE_10_19),  # its eve
        (date(2011, 6, 30), date(2021, 6, 30), AgeBand10.AGE_10_19),  # the birthday
        (date(2001, 7, 2), date(2021, 6, 30), AgeBand10.AGE_10_19),
        (date(2001, 7, 1), date(2021, 6, 30), AgeBand10.AGE_20_29),
        (date(1991, 7, 2), date(2021, 6, 30), AgeBand10.AGE_20_29),
        (date(1991, 7, 1), date(2021, 6, 30), AgeBand10.AGE_30_39),
        (date(1981, 7, 2), date(2021, 6, 30), AgeBand10.AGE_30_39),
        (date(1981, 7, 1), date(2021, 6, 30), AgeBand10.AGE_40_49),
        (date(1971, 7, 2), date(2021, 6, 30), AgeBand10.AGE_40_49),
        (date(1971, 7, 1), date(2021, 6, 30), AgeBand10.AGE_50_59),
        (date(1961, 7, 2), date(2021, 6, 30), AgeBand10.AGE_50_59),
        (date(1961, 7, 1), date(2021, 6, 30), AgeBand10.AGE_60_69),
        (date(1951, 7, 2), date(2021, 6, 30), AgeBand10.AGE_60_69),
        (date(1951, 7, 1), date(2021, 6, 30), AgeBand10.AGE_70_79),
        (date(1941, 7, 2), date(2021, 6, 30), AgeBand10.AGE_70_79),
        (date(1941, 7, 1), date(2021, 6, 30), AgeBand10.AGE_80_89),
        (date(1931, 7, 2), date(2021, 6, 30), AgeBand10.AGE_80_89),
        (date(1931, 7, 1), date(2021, 6, 30), AgeBand10.AGE_90_PLUS),
        (date(1911, 1, 1), date(2021, 6, 30), AgeBand10.AGE_90_PLUS),  # 110: still the last band
        # Born 29 February: 20 on 28 February of a common year, not on 1 March.
        (date(2000, 2, 29), date(2020, 2, 27), AgeBand10.AGE_10_19),
        (date(2000, 2, 29), date(2021, 2, 27), AgeBand10.AGE_20_29),
        (date(2001, 2, 28), date(2021, 2, 26), AgeBand10.AGE_10_19),
        (date(2001, 2, 28), date(2021, 2, 27), AgeBand10.AGE_20_29),
    ],
)
def test_age_band_10(born: date | None, on: date, band: AgeBand10) -> None:
    assert age_band_10(born, on) is band


@pytest.mark.parametrize("age", range(0, 120))
def test_age_band_10_is_the_decade_of_the_same_age_as_age_band(age: int) -> None:
    on = date(2021, 6, 30)
    born = _born(age, on)  # the birthday itself
    assert age_on(born, on) == age
    band = age_band_10(born, on)
    assert band.value == ("90-" if age >= 90 else f"{age // 10 * 10}-{age // 10 * 10 + 9}")
    # The two dimensions agree wherever the 10-year band does not straddle 65.
    if band is not AgeBand10.AGE_60_69:
        assert (age_band(born, on) is AgeBand.SIXTY_FIVE_PLUS) == (age >= 65)


def test_age_band_10_labels_are_japanese_and_complete() -> None:
    assert [AGE_BAND_10_LABELS[b] for b in AgeBand10] == [
        "10歳未満", "10代", "20代", "30代", "40代", "50代", "60代", "70代", "80代", "90歳以上", "不明",
    ]  # fmt: skip
