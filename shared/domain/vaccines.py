"""The vaccine product table and interval rules, loaded from ``vaccine_rules.toml``."""

from __future__ import annotations

import re
import tomllib
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from importlib import resources


@dataclass(frozen=True, slots=True)
class Product:
    code: str
    label: str  # ワクチンメーカー as VRS showed it
    primary_min_days: int
    primary_max_days: int | None = None  # dose 2 later than this many days after dose 1 needs review
    booster_min_months: int | None = None  # a booster of this product needs at least this, whatever the date
    lot_pattern: re.Pattern[str] | None = None  # the whole normalised lot must match

    def lot_matches(self, lot_number: str) -> bool:
        return self.lot_pattern is None or self.lot_pattern.fullmatch(normalise_lot(lot_number)) is not None


def normalise_lot(lot_number: str) -> str:
    """A lot as it is compared: NFKC (full-width ＥＹ０５８３ is EY0583), trimmed, upper-case."""
    return unicodedata.normalize("NFKC", lot_number).strip().upper()


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
        """Months that must separate a booster given on ``on`` from the dose before it (None: no rule configured).

        A booster dated before the first rule took effect (before boosters began: 2021-12-01 in Japan) is held to
        that first rule, not to none: "8 months (2021)" is the rule a 2021 booster is judged by."""
        if not self.booster_intervals:
            return None
        rule = self.booster_intervals[0]
        for interval in self.booster_intervals[1:]:
            if interval.effective_from <= on:
                rule = interval
        return rule.min_months


def _as_date(value: object) -> date:
    # A quoted TOML date ("2021-12-01") arrives as str, an unquoted one as date: accept both, and
    # never let a str reach a comparison with a dose's date (TypeError at ingest).
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str):
        return date.fromisoformat(value)
    raise ValueError(f"expected a date (YYYY-MM-DD), got {value!r}")


def _optional_int(raw: dict[str, object], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _product(raw: dict[str, object]) -> Product:
    pattern = raw.get("lot_pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise ValueError(f"lot_pattern must be a string, got {pattern!r}")
    return Product(
        code=str(raw["code"]),
        label=str(raw["label"]),
        primary_min_days=int(str(raw["primary_min_days"])),
        primary_max_days=_optional_int(raw, "primary_max_days"),
        booster_min_months=_optional_int(raw, "booster_min_months"),
        # Compiled once at load: a broken pattern fails at start-up, not at the first dose.
        lot_pattern=re.compile(pattern) if pattern is not None else None,
    )


def parse_rules(text: str) -> VaccineRules:
    raw = tomllib.loads(text)
    products = {product.code: product for product in map(_product, raw["products"])}
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
