"""The denominators of 接種率: the population of each prefecture, read in place from the team's data.

The table is 総務省's 住民基本台帳 population on 2021-01-01 (Japanese and foreign residents), one row per
prefecture. As the real VRS dashboard did, the denominator is the sum of the 21 age bands
(``population_age_band_sum``), not the 総数 (``population_total_soukei``, a few thousand larger: people
without a recorded age); 65 and over is ``population_65_and_over``. The national figures are the sums of
the 47 rows, so the prefectures add up to the nation (the source's own national 65+ row is 509 higher).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from shared.domain.codes import is_valid_prefecture_code

REQUIRED_COLUMNS = ("prefecture_code", "population_age_band_sum", "population_65_and_over")


class PopulationError(ValueError):
    """The population table is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class Denominator:
    population: int
    population_65_and_over: int


@dataclass(frozen=True)
class Population:
    by_prefecture: dict[str, Denominator]

    @property
    def national(self) -> Denominator:
        return Denominator(
            population=sum(d.population for d in self.by_prefecture.values()),
            population_65_and_over=sum(d.population_65_and_over for d in self.by_prefecture.values()),
        )


def load_population(path: Path) -> Population:
    """Parse the table; every one of the 47 prefectures exactly once, positive counts, 65+ within the total."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PopulationError(f"population table {path}: {exc.strerror or exc}") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise PopulationError(f"population table {path}: missing column(s) {', '.join(missing)}")
    rows: dict[str, Denominator] = {}
    for line, row in enumerate(reader, start=2):
        code = row["prefecture_code"].strip()
        if not is_valid_prefecture_code(code):
            raise PopulationError(f"population table {path} line {line}: prefecture_code {code!r} is not 01-47")
        if code in rows:
            raise PopulationError(f"population table {path} line {line}: prefecture {code} appears twice")
        try:
            total, senior = int(row["population_age_band_sum"]), int(row["population_65_and_over"])
        except ValueError:
            raise PopulationError(f"population table {path} line {line}: populations must be integers") from None
        if total <= 0 or not 0 < senior <= total:
            raise PopulationError(f"population table {path} line {line}: need 0 < 65 and over <= total")
        rows[code] = Denominator(population=total, population_65_and_over=senior)
    if len(rows) != 47:
        raise PopulationError(f"population table {path}: {len(rows)} prefectures, expected 47")
    return Population(by_prefecture=dict(sorted(rows.items())))
