"""Age on the day of a dose, as Japanese law counts it, and the open-data age bands."""

from __future__ import annotations

from datetime import date

import pytest

from shared.domain.age import AgeBand, age_band, age_on


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
