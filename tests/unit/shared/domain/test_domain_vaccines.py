"""The vaccine table and interval rules loaded from vaccine_rules.toml."""

from __future__ import annotations

from datetime import date

import pytest

from shared.domain.vaccines import BoosterInterval, VaccineRules, add_months, default_rules, parse_rules


@pytest.fixture(scope="module")
def rules() -> VaccineRules:
    return default_rules()


def test_default_rules_load(rules: VaccineRules) -> None:
    assert rules.version
    assert rules.program_start == date(2021, 2, 17)
    assert type(rules.program_start) is date
    assert rules.max_dose_number >= 5
    assert all(type(b.effective_from) is date for b in rules.booster_intervals)
    assert list(rules.booster_intervals) == sorted(rules.booster_intervals, key=lambda b: b.effective_from)


@pytest.mark.parametrize(
    ("code", "label", "primary_min_days"),
    [
        ("pfizer", "ファイザー", 18),  # earliest acceptable dose 2 is day 19 (MHLW Q&A 0036)
        ("moderna", "武田/モデルナ", 28),
        ("astrazeneca", "アストラゼネカ", 28),
        ("novavax", "武田", 21),
    ],
)
def test_products(rules: VaccineRules, code: str, label: str, primary_min_days: int) -> None:
    product = rules.products[code]
    assert product.code == code
    assert product.label == label
    assert product.primary_min_days == primary_min_days


@pytest.mark.parametrize(
    ("on", "months"),
    [
        # Before boosters began (2021-12-01) a booster is held to the first rule, not to none.
        (date(2021, 2, 17), 8),
        (date(2021, 11, 30), 8),
        (date(2021, 12, 1), 8),
        (date(2021, 12, 31), 8),
        (date(2022, 1, 1), 7),
        (date(2022, 12, 31), 7),
        (date(2023, 1, 1), 3),
        (date(2024, 6, 1), 3),
    ],
)
def test_booster_min_months_by_date(rules: VaccineRules, on: date, months: int | None) -> None:
    assert rules.booster_min_months(on) == months


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        (date(2021, 8, 31), 6, date(2022, 2, 28)),  # clamped, common year
        (date(2023, 8, 31), 6, date(2024, 2, 29)),  # clamped, leap year
        (date(2021, 1, 31), 1, date(2021, 2, 28)),
        (date(2021, 3, 31), 1, date(2021, 4, 30)),
        (date(2021, 5, 31), 3, date(2021, 8, 31)),
        (date(2021, 5, 1), 8, date(2022, 1, 1)),  # across a year end
        (date(2021, 12, 15), 1, date(2022, 1, 15)),
        (date(2021, 12, 15), 12, date(2022, 12, 15)),
        (date(2021, 12, 15), 25, date(2024, 1, 15)),
        (date(2020, 2, 29), 12, date(2021, 2, 28)),
        (date(2021, 6, 10), 0, date(2021, 6, 10)),
        (date(2022, 1, 15), -1, date(2021, 12, 15)),
        (date(2022, 3, 31), -1, date(2022, 2, 28)),
    ],
)
def test_add_months(start: date, months: int, expected: date) -> None:
    assert add_months(start, months) == expected


_TABLE = """
version = "test.1"
program_start = {start}
max_dose_number = 5

[[products]]
code = "pfizer"
label = "ファイザー"
primary_min_days = 18

[[booster_intervals]]
effective_from = {later}
min_months = 7

[[booster_intervals]]
effective_from = {earlier}
min_months = 8
"""


@pytest.mark.parametrize(
    ("start", "earlier", "later"),
    [
        ('"2021-02-17"', '"2021-12-01"', '"2022-01-01"'),  # quoted, as in vaccine_rules.toml
        ("2021-02-17", "2021-12-01", "2022-01-01"),  # TOML local dates
    ],
)
def test_parse_rules_gives_dates_and_sorts_boosters(start: str, earlier: str, later: str) -> None:
    rules = parse_rules(_TABLE.format(start=start, earlier=earlier, later=later))
    assert rules.version == "test.1"
    assert rules.program_start == date(2021, 2, 17)
    assert rules.booster_intervals == (
        BoosterInterval(effective_from=date(2021, 12, 1), min_months=8),
        BoosterInterval(effective_from=date(2022, 1, 1), min_months=7),
    )
    assert rules.booster_min_months(date(2021, 12, 15)) == 8
    assert rules.booster_min_months(date(2022, 1, 15)) == 7
