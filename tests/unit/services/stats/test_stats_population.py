"""The population table behind the coverage rates: the real file, and every way a file can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.stats.population import PopulationError, load_population
from services.stats.settings import POPULATION_FILE
from tests.factories import team_data

HEADER = "prefecture_code,prefecture,population_age_band_sum,population_65_and_over\n"


def table(rows: list[str]) -> str:
    return HEADER + "".join(row + "\n" for row in rows)


GOOD_ROWS = [f"{code:02d},P,{1000 + code},{100 + code}" for code in range(1, 48)]


def test_the_real_table_gives_the_dashboards_denominators() -> None:
    population = load_population(team_data(POPULATION_FILE))
    assert len(population.by_prefecture) == 47
    # The sum of the age bands (what the real dashboard divided by), not the 総数 126,654,244.
    assert population.national.population == 126_645_025
    # The sum of the prefectures, not the source's own national row (509 more).
    assert population.national.population_65_and_over == 35_767_994
    assert population.by_prefecture["13"].population > population.by_prefecture["13"].population_65_and_over > 0


def test_a_good_table_loads(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(table(GOOD_ROWS), encoding="utf-8")
    population = load_population(path)
    assert population.by_prefecture["47"].population == 1047
    assert population.national.population == sum(1000 + c for c in range(1, 48))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("prefecture_code,population_age_band_sum\n", "missing column(s) population_65_and_over"),
        (table(GOOD_ROWS[:-1]), "46 prefectures, expected 47"),
        (table([*GOOD_ROWS, "13,P,5,1"]), "prefecture 13 appears twice"),
        (table(["48,P,5,1", *GOOD_ROWS[1:]]), "'48' is not 01-47"),
        (table(["01,P,many,1", *GOOD_ROWS[1:]]), "must be integers"),
        (table(["01,P,5,6", *GOOD_ROWS[1:]]), "65 and over <= total"),
        (table(["01,P,0,0", *GOOD_ROWS[1:]]), "65 and over <= total"),
    ],
)
def test_a_wrong_table_is_refused_naming_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "p.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PopulationError, match=r"p\.csv") as raised:
        load_population(path)
    assert problem in str(raised.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PopulationError, match=r"nowhere\.csv"):
        load_population(tmp_path / "nowhere.csv")
