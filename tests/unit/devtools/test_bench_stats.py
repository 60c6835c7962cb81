"""The stats bench's own arithmetic: freshness percentiles from a scraped histogram, py-spy's top lines, and
the resident file it seeds registry with."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest

from devtools.bench.profile import top_lines
from devtools.bench.stats import Ages, Person, resident_csv

INF = float("inf")


def test_a_quantile_is_interpolated_inside_its_bucket_as_prometheus_does() -> None:
    # 100 events: 50 within 0.1 s, 40 more within 0.5 s, 10 more within 1 s.
    ages = Ages({0.1: 50, 0.5: 90, 1.0: 100, INF: 100})
    assert ages.count == 100
    assert ages.quantile(0.5) == pytest.approx(0.1)
    assert ages.quantile(0.7) == pytest.approx(0.1 + 0.4 * (20 / 40))
    assert ages.quantile(0.99) == pytest.approx(0.5 + 0.5 * (9 / 10))
    assert ages.bucket_of(0.99) == 1.0
    assert "p99    950 ms" in ages.describe()


def test_a_window_of_the_histogram_is_the_difference_of_two_scrapes() -> None:
    before = Ages({0.1: 10, 1.0: 10, INF: 10})
    after = Ages({0.1: 10, 1.0: 30, INF: 31})
    window = after.since(before)
    assert window.count == 21
    assert window.quantile(0.5) > 0.1  # the ten old fast events are not in the window
    assert window.quantile(1.0) == 1.0  # the slowest is past the last finite bound: its lower edge
    assert Ages({}).describe() == "no event applied"
    assert math.isnan(Ages({}).quantile(0.5))


def test_the_top_lines_name_the_innermost_frames_and_the_projects_own_functions(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(
        "main (shared/cli.py:10);step (shared/consumer.py:20);execute (asyncpg/connection.py:30) 3\n"
        "main (shared/cli.py:10);decode (services/stats/service.py:40);validate (pydantic/main.py:50) 1\n"
        "garbage line\n"
    )
    lines = top_lines(raw, 5)
    assert lines[0] == "4 samples; self:"
    assert lines[1].split() == ["75.0%", "execute", "(asyncpg/connection.py:30)"]
    inclusive = lines[lines.index("inclusive (the project's own functions):") + 1 :]
    assert inclusive[0].split() == ["100.0%", "main", "(shared/cli.py:10)"]
    assert not any("asyncpg" in line or "pydantic" in line for line in inclusive)


def test_the_resident_file_is_the_contracts_csv() -> None:
    people = [Person("131016", "bench-0", "F", "1940-04-01", "9000000000")]
    rows = list(csv.DictReader(io.StringIO(resident_csv(people).decode())))
    assert rows == [
        {
            "resident_id": "bench-0",
            "name": "統計 太郎",
            "name_kana": "トウケイ タロウ",
            "birth_date": "1940-04-01",
            "sex": "F",
            "coupon_number": "9000000000",
        }
    ]
