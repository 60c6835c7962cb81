"""The open-data exports reproduce the Digital Agency's files byte for byte.

The real files are read in place from the team folder (``VRS_SHARED_DATA``, default ``../shared/data``):
absent in a plain clone (skip), always present on CI (fail).
"""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import date

import httpx
from sqlalchemy import insert

from services.stats.models import dose_counts
from services.stats.repository import RollupRepository
from shared.db import Database
from shared.domain.age import AgeBand
from shared.domain.codes import municipality_check_digit
from shared.events import StatsCell
from tests.factories import AddCells, cell, team_data
from tests.integration.services.stats.conftest import assert_rollups_match

NDJSON = "/api/v1/opendata/prefecture.ndjson"
CSV = "/api/v1/opendata/summary_by_date.csv"


def prefecture_body(prefecture: str) -> str:
    """A valid municipality code in ``prefecture`` (the prefecture's own: body PP000 + check digit)."""
    body = f"{prefecture}000"
    return f"{body}{municipality_check_digit(body)}"


async def test_prefecture_ndjson_equals_the_published_file(client: httpx.AsyncClient, database: Database) -> None:
    path = team_data("opendata/prefecture-2021-07-15.ndjson")
    published = path.read_bytes()
    rows = []
    for line in published.decode().splitlines():
        r = json.loads(line)
        rows.append(
            {
                "date": date.fromisoformat(r["date"]),
                "prefecture": r["prefecture"],
                "municipality": prefecture_body(r["prefecture"]),
                "sex": r["gender"],
                "age_band": r["age"],
                "medical_worker": r["medical_worker"],
                "dose_number": r["status"],
                "vaccine": "pfizer",
                "count": r["count"],
            }
        )
    assert len(rows) == 37_751
    async with database.sessionmaker() as session, session.begin():
        await session.execute(insert(dose_counts), rows)
        await RollupRepository(session).refill()  # the export reads the rollup of the open data's cells
    await assert_rollups_match(database)

    started = time.perf_counter()
    response = await client.get(NDJSON)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.content == published
    print(f"prefecture.ndjson: {len(rows)} rows, {len(published)} bytes in {elapsed:.2f}s")


async def test_prefecture_ndjson_sums_municipalities_and_vaccines(
    client: httpx.AsyncClient, add_cells: AddCells
) -> None:
    await add_cells(
        {
            # Two municipalities and two vaccines of one cell of the file: one line.
            cell(): 3,
            cell(municipality="131032"): 2,
            cell(vaccine="moderna"): 1,
            # Sorted by gender F, M, U, then age -64, 65-, UNK, then medical_worker, then status.
            cell(sex="U", age_band=AgeBand.UNKNOWN): 1,
            cell(sex="M", age_band=AgeBand.UNKNOWN): 1,
            cell(sex="M", age_band=AgeBand.SIXTY_FIVE_PLUS): 1,
            cell(medical_worker=True): 4,
            cell(dose_number=2): 2,
            cell(prefecture="01", municipality="011002"): 1,
            cell(date=date(2021, 5, 31), prefecture="47", municipality="472018"): 8,
            cell(date=date(2021, 6, 2)): 0,  # empty cells have no line
        },
    )
    await add_cells({cell(dose_number=3): 1})
    await add_cells({cell(dose_number=3): -1})
    response = await client.get(NDJSON)
    assert response.text == (
        '{"date":"2021-05-31","prefecture":"47","gender":"F","age":"-64","medical_worker":false,"status":1,"count":8}\n'
        '{"date":"2021-06-01","prefecture":"01","gender":"F","age":"-64","medical_worker":false,"status":1,"count":1}\n'
        '{"date":"2021-06-01","prefecture":"13","gender":"F","age":"-64","medical_worker":false,"status":1,"count":6}\n'
        '{"date":"2021-06-01","prefecture":"13","gender":"F","age":"-64","medical_worker":false,"status":2,"count":2}\n'
        '{"date":"2021-06-01","prefecture":"13","gender":"F","age":"-64","medical_worker":true,"status":1,"count":4}\n'
        '{"date":"2021-06-01","prefecture":"13","gender":"M","age":"65-","medical_worker":false,"status":1,"count":1}\n'
        '{"date":"2021-06-01","prefecture":"13","gender":"M","age":"UNK","medical_worker":false,"status":1,"count":1}\n'
        '{"date":"2021-06-01","prefecture":"13","gender":"U","age":"UNK","medical_worker":false,"status":1,"count":1}\n'
    )


async def test_empty_exports(client: httpx.AsyncClient) -> None:
    assert (await client.get(NDJSON)).content == b""
    response = await client.get(CSV)
    assert response.content == b"date,count_first_or_mid_general,count_second_or_full_general\n"


async def test_summary_by_date_csv_has_the_published_format(client: httpx.AsyncClient, add_cells: AddCells) -> None:
    """The published numbers came from another basis, so feed cells that yield them and compare bytes."""
    path = team_data("opendata/summary_by_date-2021-07-15.csv")
    published = path.read_bytes()
    deltas: dict[StatsCell, int] = {}
    for row in csv.DictReader(io.StringIO(published.decode())):
        day = date.fromisoformat(row["date"])
        for dose, column in ((1, "count_first_or_mid_general"), (2, "count_second_or_full_general")):
            if int(row[column]):
                # Split over two prefectures and two vaccines: the CSV sums them.
                deltas[cell(date=day, dose_number=dose)] = int(row[column]) - 1
                deltas[cell(date=day, dose_number=dose, prefecture="01", municipality="011002", vaccine="moderna")] = 1
        # Neither medical workers nor third doses count in these columns.
        deltas[cell(date=day, medical_worker=True)] = 5
        deltas[cell(date=day, dose_number=3)] = 7
    await add_cells({c: n for c, n in deltas.items() if n})

    response = await client.get(CSV)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.content == published
