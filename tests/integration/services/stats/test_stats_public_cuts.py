"""Fine cuts (municipality, vaccine) for the public: counts 1-9 hidden, and the one cell that would give a
hidden count away by subtraction from a published total hidden with it; national users see every count.
Every cut comes in pages."""

from __future__ import annotations

from datetime import date

import httpx
import pytest

from shared.auth import Role
from tests.factories import AddCells, cell
from tests.integration.services.stats.test_stats_api import NATIONAL, bearer

DOSES = "/api/v1/stats/doses"
CHIYODA, MINATO, SHINJUKU = "131016", "131032", "131041"
SAPPORO, HAKODATE, OTARU = "011002", "012025", "012033"


@pytest.fixture
async def towns(add_cells: AddCells) -> None:
    hokkaido = {"prefecture": "01"}
    await add_cells(
        {
            cell(municipality=CHIYODA): 25,
            cell(municipality=MINATO): 3,  # small
            cell(municipality=SHINJUKU): 12,  # Tokyo's total minus the others would give Minato away
            cell(municipality=SHINJUKU, vaccine="moderna", date=date(2021, 6, 2)): 0,
            cell(municipality=SAPPORO, **hokkaido): 40,
            cell(municipality=HAKODATE, **hokkaido): 5,  # two small cells: neither can be subtracted out
            cell(municipality=OTARU, **hokkaido): 2,
            cell(municipality=CHIYODA, vaccine="moderna"): 2,
        }
    )


@pytest.mark.usefixtures("towns")
async def test_municipality_cut_for_the_public_hides_small_counts_and_what_would_reveal_them(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(DOSES, params={"group_by": "municipality"})
    assert response.status_code == 200
    body = response.json()
    assert body["rows"] == [
        {"municipality": SAPPORO, "count": 40},
        {"municipality": HAKODATE, "count": None},
        {"municipality": OTARU, "count": None},
        {"municipality": CHIYODA, "count": 27},
        {"municipality": MINATO, "count": None},
        {"municipality": SHINJUKU, "count": None},  # 12, but Tokyo's 42 − 27 would tell Minato's 3
    ]
    assert body["suppressed"] == 4
    # Other roles than national are the public here too.
    for role in (bearer(Role.MUNICIPALITY, municipality=CHIYODA), bearer(Role.INSTITUTION, institution="1312345678")):
        assert (await client.get(DOSES, params={"group_by": "municipality"}, headers=role)).json() == body

    exact = (await client.get(DOSES, params={"group_by": "municipality"}, headers=NATIONAL)).json()
    assert [r["count"] for r in exact["rows"]] == [40, 5, 2, 27, 3, 12]
    assert "suppressed" not in exact


@pytest.mark.usefixtures("towns")
@pytest.mark.parametrize(("municipality", "expected"), [(SHINJUKU, None), (MINATO, None), (CHIYODA, 27), ("132012", 0)])
async def test_one_municipality_hides_exactly_what_the_grouped_cut_hides(
    client: httpx.AsyncClient, municipality: str, expected: int | None
) -> None:
    body = (await client.get(DOSES, params={"municipality": municipality})).json()
    assert body["rows"] == [{"count": expected}]
    by_date = (await client.get(DOSES, params={"municipality": municipality, "group_by": "date"})).json()["rows"]
    assert by_date == ([] if expected == 0 else [{"date": "2021-06-01", "count": expected}])


@pytest.mark.usefixtures("towns")
async def test_vaccine_cuts_are_fine_cuts_too(client: httpx.AsyncClient) -> None:
    rows = (await client.get(DOSES, params={"group_by": "prefecture,vaccine"})).json()["rows"]
    assert rows == [
        {"prefecture": "01", "vaccine": "pfizer", "count": 47},
        {"prefecture": "13", "vaccine": "moderna", "count": None},
        {"prefecture": "13", "vaccine": "pfizer", "count": None},  # Tokyo's published total minus it
    ]
    # Cuts no finer than the open data stay exact for everyone.
    assert (await client.get(DOSES, params={"group_by": "prefecture"})).json()["rows"] == [
        {"prefecture": "01", "count": 47},
        {"prefecture": "13", "count": 42},
    ]


@pytest.mark.usefixtures("towns")
async def test_cuts_come_in_pages(client: httpx.AsyncClient) -> None:
    whole = (await client.get(DOSES, params={"group_by": "municipality,vaccine"}, headers=NATIONAL)).json()
    assert "next_offset" not in whole
    pages, offset = [], 0
    while True:
        params = {"group_by": "municipality,vaccine", "limit": "3", "offset": str(offset)}
        response = await client.get(DOSES, params=params, headers=NATIONAL)
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        pages.append(body["rows"])
        if "next_offset" not in body:
            break
        offset = body["next_offset"]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [row for page in pages for row in page] == whole["rows"]

    too_many = await client.get(DOSES, params={"group_by": "date", "limit": "50001"})
    assert too_many.status_code == 422
    assert too_many.json()["errors"][0]["field"] == "limit"
    assert (await client.get(DOSES, params={"group_by": "date", "offset": "-1"})).status_code == 422
