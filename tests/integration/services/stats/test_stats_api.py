"""GET /api/v1/stats/doses and the dashboard: shapes, order, filters, permissions; health of the app."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.stats.app import create_app
from services.stats.settings import StatsSettings
from shared.auth import Role
from shared.bus import OutgoingMessage, make_publisher
from shared.domain.age import AgeBand, AgeBand10
from shared.events import DoseEvent, DoseEventType, StatsCell
from shared.settings import BusSettings
from tests.factories import AddCells, cell, internal_headers

DOSES = "/api/v1/stats/doses"


bearer = internal_headers
NATIONAL = bearer(Role.NATIONAL)


# A small world: Tokyo's 千代田区 and 港区, Sapporo; both sexes, all age bands, three days.
CHIYODA, MINATO, SAPPORO = "131016", "131032", "011002"
WORLD: dict[StatsCell, int] = {
    cell(): 5,
    cell(sex="M"): 3,
    cell(sex="U", age_band=AgeBand.UNKNOWN): 2,
    cell(municipality=MINATO, age_band=AgeBand.SIXTY_FIVE_PLUS): 4,
    cell(municipality=MINATO, age_band=AgeBand.SIXTY_FIVE_PLUS, vaccine="moderna"): 1,
    cell(date=date(2021, 6, 2), dose_number=2): 7,
    cell(date=date(2021, 6, 3), municipality=SAPPORO, prefecture="01", sex="M"): 6,
    cell(date=date(2021, 6, 3), municipality=SAPPORO, prefecture="01", medical_worker=True): 1,
}


@pytest.fixture
async def world(add_cells: AddCells) -> None:
    await add_cells(WORLD)
    # A dose recorded and then voided leaves its cell at zero; it must not show as a row.
    await add_cells({cell(date=date(2021, 6, 4)): 1})
    await add_cells({cell(date=date(2021, 6, 4)): -1})


async def test_empty_database_gives_a_zero_total_and_no_as_of(client: httpx.AsyncClient) -> None:
    response = await client.get(DOSES)
    assert response.status_code == 200
    assert response.json() == {"as_of": None, "rows": [{"count": 0}]}
    response = await client.get(DOSES, params={"group_by": "date"})
    assert response.json() == {"as_of": None, "rows": []}


@pytest.mark.usefixtures("world")
async def test_total_without_group_by(client: httpx.AsyncClient) -> None:
    assert (await client.get(DOSES)).json()["rows"] == [{"count": 29}]
    assert (await client.get(DOSES, params={"group_by": ""})).json()["rows"] == [{"count": 29}]


@pytest.mark.usefixtures("world")
async def test_rows_keep_the_asked_key_order_and_are_sorted(client: httpx.AsyncClient) -> None:
    response = await client.get(DOSES, params={"group_by": "prefecture,date"})
    assert response.status_code == 200
    rows = response.json()["rows"]
    assert rows == [
        {"prefecture": "01", "date": "2021-06-03", "count": 7},
        {"prefecture": "13", "date": "2021-06-01", "count": 15},
        {"prefecture": "13", "date": "2021-06-02", "count": 7},
    ]
    assert [list(r) for r in rows] == [["prefecture", "date", "count"]] * 3


@pytest.mark.usefixtures("world")
async def test_every_dimension_and_its_json_type(client: httpx.AsyncClient) -> None:
    group_by = "date,prefecture,sex,age_band,age_band_10,medical_worker,dose_number,vaccine"
    rows = (await client.get(DOSES, params={"group_by": group_by}, headers=NATIONAL)).json()["rows"]
    assert sum(r["count"] for r in rows) == 29
    assert rows[0] == {
        "date": "2021-06-01",
        "prefecture": "13",
        "sex": "F",
        "age_band": "-64",
        "age_band_10": "UNK",
        "medical_worker": False,
        "dose_number": 1,
        "vaccine": "pfizer",
        "count": 5,
    }
    sample = next(r for r in rows if r["medical_worker"])
    assert sample["medical_worker"] is True and sample["prefecture"] == "01"


@pytest.mark.usefixtures("world")
async def test_sex_and_age_bands_sort_in_their_published_order(client: httpx.AsyncClient) -> None:
    rows = (await client.get(DOSES, params={"group_by": "sex,age_band", "prefecture": "13"})).json()["rows"]
    assert [(r["sex"], r["age_band"], r["count"]) for r in rows] == [
        ("F", "-64", 12),
        ("F", "65-", 5),
        ("M", "-64", 3),
        ("U", "UNK", 2),
    ]


async def test_10_year_bands_sort_youngest_first_and_unknown_last(
    client: httpx.AsyncClient, add_cells: AddCells
) -> None:
    """``age_band_10`` is one more dimension; its order is by age, not by string ("10-19" < "0-9")."""
    bands = [AgeBand10.AGE_90_PLUS, AgeBand10.AGE_10_19, AgeBand10.UNKNOWN, AgeBand10.AGE_0_9, AgeBand10.AGE_60_69]
    await add_cells({cell(age_band_10=band): 10 + i for i, band in enumerate(bands)})
    rows = (await client.get(DOSES, params={"group_by": "age_band_10"})).json()["rows"]
    assert rows == [
        {"age_band_10": "0-9", "count": 13},
        {"age_band_10": "10-19", "count": 11},
        {"age_band_10": "60-69", "count": 14},
        {"age_band_10": "90-", "count": 10},
        {"age_band_10": "UNK", "count": 12},
    ]
    rows = (await client.get(DOSES, params={"group_by": "age_band,age_band_10,date"}, headers=NATIONAL)).json()["rows"]
    assert rows[0] == {"age_band": "-64", "age_band_10": "0-9", "date": "2021-06-01", "count": 13}


async def test_10_year_bands_are_a_fine_cut_for_the_public(client: httpx.AsyncClient, add_cells: AddCells) -> None:
    """Finer than the open data: small counts hidden, and the one other cell that the published total
    (summed over the 10-year bands) would give away; exact for national users."""
    await add_cells(
        {
            cell(age_band_10=AgeBand10.AGE_20_29): 30,
            cell(age_band_10=AgeBand10.AGE_30_39): 12,
            cell(age_band_10=AgeBand10.AGE_40_49): 4,  # small
            cell(age_band_10=AgeBand10.AGE_40_49, dose_number=2): 50,
        }
    )
    body = (await client.get(DOSES, params={"group_by": "dose_number,age_band_10"})).json()
    assert body["rows"] == [
        {"dose_number": 1, "age_band_10": "20-29", "count": 30},
        {"dose_number": 1, "age_band_10": "30-39", "count": None},  # dose 1's total 46 − 30 would give 4 away
        {"dose_number": 1, "age_band_10": "40-49", "count": None},
        {"dose_number": 2, "age_band_10": "40-49", "count": 50},
    ]
    assert body["suppressed"] == 2
    exact = (await client.get(DOSES, params={"group_by": "dose_number,age_band_10"}, headers=NATIONAL)).json()
    assert [r["count"] for r in exact["rows"]] == [30, 12, 4, 50]


async def test_a_cached_answer_is_never_older_than_the_aggregates(
    client: httpx.AsyncClient, add_cells: AddCells
) -> None:
    """Answers are kept per process by the aggregates' version: the next change is seen at once."""
    questions = [(DOSES, {"group_by": "date,dose_number"}), (DOSES, {}), ("/api/v1/stats/coverage", {})]

    async def ask() -> list[bytes]:
        return [(await client.get(path, params=params)).content for path, params in questions]

    await add_cells({cell(): 3})
    first = await ask()
    assert await ask() == first  # the same aggregates: the same bytes (from the cache)
    await add_cells({cell(): 2})
    second = await ask()
    assert all(a != b for a, b in zip(first, second, strict=True)), second
    assert (await client.get(DOSES)).json()["rows"] == [{"count": 5}]
    rows = (await client.get("/api/v1/stats/coverage")).json()["rows"]
    assert [r["count"] for r in rows if r["dose_number"] == 1] == [5]


@pytest.mark.usefixtures("world")
async def test_filters_by_period_and_prefecture(client: httpx.AsyncClient) -> None:
    async def total(**params: str) -> int:
        response = await client.get(DOSES, params=params)
        assert response.status_code == 200, response.text
        return int(response.json()["rows"][0]["count"])

    assert await total(**{"from": "2021-06-02"}) == 14
    assert await total(to="2021-06-02") == 22
    assert await total(**{"from": "2021-06-02", "to": "2021-06-02"}) == 7  # both ends inclusive
    assert await total(prefecture="01") == 7
    assert await total(prefecture="13", **{"from": "2021-06-01", "to": "2021-06-01"}) == 15
    assert await total(prefecture="47") == 0


@pytest.mark.usefixtures("world")
async def test_national_users_see_municipality_cuts_exactly(client: httpx.AsyncClient) -> None:
    by_municipality = {"group_by": "municipality,vaccine"}
    for headers in (NATIONAL,):
        response = await client.get(DOSES, params=by_municipality, headers=headers)
        assert response.status_code == 200
        body = response.json()
        assert body["rows"] == [
            {"municipality": SAPPORO, "vaccine": "pfizer", "count": 7},
            {"municipality": CHIYODA, "vaccine": "pfizer", "count": 17},
            {"municipality": MINATO, "vaccine": "moderna", "count": 1},
            {"municipality": MINATO, "vaccine": "pfizer", "count": 4},
        ]
        assert "suppressed" not in body
    filtered = await client.get(DOSES, params={"municipality": MINATO}, headers=NATIONAL)
    assert filtered.json()["rows"] == [{"count": 5}]


async def test_only_groups_above_zero_are_rows(client: httpx.AsyncClient, add_cells: AddCells) -> None:
    """A cell below zero (a void applied before its dose, across partitions) is never shown on its own."""
    await add_cells({cell(): 2, cell(date=date(2021, 6, 2)): -1, cell(date=date(2021, 6, 3)): 0})
    rows = (await client.get(DOSES, params={"group_by": "date"})).json()["rows"]
    assert rows == [{"date": "2021-06-01", "count": 2}]


async def test_public_cuts_ignore_the_callers_role(client: httpx.AsyncClient) -> None:
    headers = bearer(Role.MUNICIPALITY, municipality=CHIYODA)
    assert (await client.get(DOSES, params={"group_by": "prefecture"}, headers=headers)).status_code == 200
    assert (await client.get(DOSES, headers={"Authorization": "Bearer not-a-token"})).status_code == 401


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"group_by": "date,town"}, "group_by"),
        ({"group_by": "name"}, "group_by"),
        ({"group_by": "date,,sex"}, "group_by"),
        ({"group_by": "date,date"}, "group_by"),
        ({"group_by": "count"}, "group_by"),
        ({"from": "2021/06/01"}, "from"),
        ({"from": "2021-13-01"}, "from"),
        ({"to": "20210601"}, "to"),
        ({"from": "2021-06-02", "to": "2021-06-01"}, "to"),
        ({"prefecture": "48"}, "prefecture"),
        ({"prefecture": "1"}, "prefecture"),
        ({"municipality": "131015"}, "municipality"),  # wrong check digit
    ],
)
async def test_bad_parameters_are_invalid_fields(client: httpx.AsyncClient, params: dict[str, str], field: str) -> None:
    response = await client.get(DOSES, params=params, headers=NATIONAL)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "InvalidField"
    assert [e["field"] for e in body["errors"]] == [field]


async def test_as_of_is_when_the_consumer_last_applied_a_batch(stats_dsn: str, bus: BusSettings) -> None:
    """The app runs the consumer in its lifespan; what is published shows up in the API with an as_of."""
    app = create_app(StatsSettings(main_dsn=stats_dsn, bus=bus, run_consumer=True, poll_timeout_seconds=0.05))
    publisher = make_publisher(bus)
    before = datetime.now(UTC) - timedelta(seconds=1)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://stats.test", headers=bearer(Role.ANONYMOUS)
        ) as client,
    ):
        assert app.state.consumer is not None and app.state.consumer.running
        events = [
            DoseEvent(type=DoseEventType.RECORDED, dose_id=dose, municipality=CHIYODA, cell=cell(), previous_cell=None)
            for dose in (uuid.uuid4() for _ in range(3))
        ]
        await publisher.publish([OutgoingMessage(key=e.key, value=e.to_bytes()) for e in events])
        await publisher.close()
        deadline = time.monotonic() + 20
        # as_of is read before the rows (so it never claims more than they show): a request racing the
        # consumer's commit may see the rows and not yet the time; the next one sees both.
        while (body := (await client.get(DOSES)).json())["rows"] != [{"count": 3}] or body["as_of"] is None:
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.05)
        as_of = datetime.fromisoformat(body["as_of"])
        assert as_of.tzinfo is not None
        assert before <= as_of <= datetime.now(UTC)
        consumer = app.state.consumer
    assert not consumer.running  # the lifespan stopped it


async def test_health_readiness_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok", "service": "stats"}
    assert (await client.get("/readyz")).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert "vrs_stats_events_applied_total" in metrics
    assert "vrs_stats_event_lag_seconds_bucket" in metrics


async def test_readiness_fails_without_the_database(tmp_path: Any, bus: BusSettings) -> None:
    app = create_app(
        StatsSettings(main_dsn=f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'x.db'}", bus=bus, run_consumer=False)
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://stats.test", headers=bearer(Role.ANONYMOUS)
        ) as client,
    ):
        assert (await client.get("/readyz")).status_code == 503


async def test_dashboard_is_a_self_contained_japanese_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert '<html lang="ja">' in html
    assert "接種状況" in html and "北海道" in html and "沖縄県" in html
    # It asks its own origin, so it works through the gateway at the same path.
    assert '"/api/v1/stats/doses"' in html
    # Nothing from elsewhere: no CDN script, stylesheet or font (the SVG namespace is a name, not a URL fetched).
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "@font-face" not in html
    assert re.sub(r"http://www\.w3\.org/2000/svg", "", html).count("http") == 0
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # Scripts from its own origin (the chart library) and its one inline script, nothing else.
    assert re.search(r"^script-src 'self' 'sha256-[A-Za-z0-9+/]+=*'$", csp.split(";")[1].strip())
    assert '<script src="/dashboard/echarts.min.js"></script>' in html


async def test_the_chart_library_is_served_by_stats(client: httpx.AsyncClient) -> None:
    response = await client.get("/dashboard/echarts.min.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert b"echarts" in response.content[:4096] and len(response.content) > 500_000
    assert (await client.get("/dashboard/other.js")).status_code == 404


async def test_without_its_chart_library_the_dashboard_says_why(
    stats_dsn: str, bus: BusSettings, tmp_path: Any
) -> None:
    missing = tmp_path / "echarts.min.js"
    app = create_app(StatsSettings(main_dsn=stats_dsn, bus=bus, run_consumer=False, echarts_path=missing))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://stats.test",
            headers=internal_headers(Role.ANONYMOUS),
        ) as client,
    ):
        response = await client.get("/dashboard")
        assert response.status_code == 503
        assert "Apache ECharts" in response.text and "npm ci" in response.text
        assert str(tmp_path) not in response.text  # the server's paths stay in its log
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert (await client.get("/dashboard/echarts.min.js")).status_code == 404
        assert (await client.get(DOSES)).status_code == 200
