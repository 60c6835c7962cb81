"""The vaccine product table and interval rules, loaded from ``vaccine_rules.toml``."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from importlib import resources


@dataclass(frozen=True, slots=True)
class Product:
    code: str
    label: str  # ワクチンメーカー as VRS showed it
    primary_min_days: int


@dataclass(frozen=True, slots=True)
class BoosterInterval:
    effective_from: date
    min_months: int


@dataclass(frozen=True, slots=True)
class VaccineRules:
    version: str
    program_start: date
    max_dose_number: int
    products: dict[str, Product]
    booster_intervals: tuple[BoosterInterval, ...]  # sorted by effective_from

    def booster_min_months(self, on: date) -> int | None:
        """Months that must separate a booster given on ``on`` from the dose before it."""
        rule = None
        for interval in self.booster_intervals:
            if interval.effective_from <= on:
                rule = interval
        return rule.min_months if rule else None


def _as_date(value: object) -> date:
    # A quoted TOML date ("2021-12-01") arrives as str, an unquoted one as date: accept both, and
    # never let a str reach a comparison with a dose's date (TypeError at ingest).
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str):
        return date.fromisoformat(value)
    raise ValueError(f"expected a date (YYYY-MM-DD), got {value!r}")


def parse_rules(text: str) -> VaccineRules:
    raw = tomllib.loads(text)
    products = {
        p["code"]: Product(code=p["code"], label=p["label"], primary_min_days=int(p["primary_min_days"]))
        for p in raw["products"]
    }
    boosters = tuple(
        sorted(
            (
                BoosterInterval(effective_from=_as_date(b["effective_from"]), min_months=int(b["min_months"]))
                for b in raw.get("booster_intervals", [])
            ),
            key=lambda b: b.effective_from,
        )
    )
    return VaccineRules(
        version=str(raw["version"]),
        program_start=_as_date(raw["program_start"]),
        max_dose_number=int(raw["max_dose_number"]),
        products=products,
        booster_intervals=boosters,
    )


@cache
def default_rules() -> VaccineRules:
    text = resources.files("shared.domain").joinpath("vaccine_rules.toml").read_text(encoding="utf-8")
    return parse_rules(text)


def add_months(d: date, months: int) -> date:
    """``d`` plus whole months, clamped to the month's last day (31 Aug + 6 months = 28/29 Feb)."""
    month_index = d.month - 1 + months
    year, month = d.year + month_index // 12, month_index % 12 + 1
    for day in (d.day, 30, 29, 28):
        try:
            return date(year, month, day)
        except ValueError:
            continue
    raise AssertionError("unreachable")
