"""GET /api/v1/stats/coverage: people with at least dose N over the real population table, exact when doses
are corrected, voided or delivered twice (the events go through the real consumer and bus)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from services.stats.app import create_app
from services.stats.consumer import StatsConsumer
from services.stats.population import load_population
from services.stats.settings import POPULATION_FILE, StatsSettings
from shared.auth import Role
from shared.domain.age import AgeBand
from shared.events import DoseEvent, DoseEventType, StatsCell
from shared.settings import BusSettings
from tests.factories import cell, internal_headers, team_data
from tests.integration.services.stats.test_stats_consumer import publish

COVERAGE = "/api/v1/stats/coverage"


@pytest.fixture
async def coverage_app(stats_dsn: str, bus: BusSettings) -> AsyncIterator[FastAPI]:
    settings = StatsSettings(
        main_dsn=stats_dsn, bus=bus, run_consumer=False, population_path=team_data(POPULATION_FILE)
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(coverage_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=coverage_app),
        base_url="http://stats.test",
        headers=internal_headers(Role.ANONYMOUS),
    ) as c:
        yield c


def dose(kind: DoseEventType, dose_id: uuid.UUID, new: StatsCell | None, old: StatsCell | None = None) -> DoseEvent:
    return DoseEvent(
        type=kind, dose_id=dose_id, municipality=(new or old or cell()).municipality, cell=new, previous_cell=old
    )


async def apply(app: FastAPI, bus: BusSettings, *events: DoseEvent) -> None:
    await publish(bus, events)
    consumer = StatsConsumer(app.state.databases.main, bus=bus, poll_timeout=0.1)
    await consumer.drain()


async def test_coverage_counts_people_per_dose_through_corrections_voids_and_redelivery(
    coverage_app: FastAPI, client: httpx.AsyncClient, bus: BusSettings
) -> None:
    population = load_population(team_data(POPULATION_FILE))
    tokyo, hokkaido = population.by_prefecture["13"], population.by_prefecture["01"]
    senior = cell(age_band=AgeBand.SIXTY_FIVE_PLUS)
    a1, a2, b1, c1, d1 = (uuid.uuid4() for _ in range(5))
    recorded = [
        dose(DoseEventType.RECORDED, a1, senior),  # A, 65+, in Tokyo: doses 1 and 2
        dose(DoseEventType.RECORDED, a2, senior.model_copy(update={"dose_number": 2})),
        dose(DoseEventType.RECORDED, b1, cell()),  # B, under 65, in Tokyo
        dose(DoseEventType.RECORDED, c1, cell(sex="U", age_band=AgeBand.UNKNOWN)),  # C, not yet matched
        dose(DoseEventType.RECORDED, d1, cell(date=cell().date.replace(day=2))),  # D, recorded then voided
    ]
    await apply(coverage_app, bus, *recorded)
    later = [
        # B's dose was entered under the wrong number: it was B's second dose (−1 on dose 1, +1 on dose 2).
        dose(DoseEventType.CORRECTED, b1, cell(dose_number=2), cell()),
        # C's holder registered: a Hokkaido resident over 65.
        dose(
            DoseEventType.MATCHED,
            c1,
            cell(prefecture="01", municipality="011002", sex="M", age_band=AgeBand.SIXTY_FIVE_PLUS),
            cell(sex="U", age_band=AgeBand.UNKNOWN),
        ),
        dose(DoseEventType.VOIDED, d1, None, cell(date=cell().date.replace(day=2))),
        recorded[0],  # the relay published A's first dose again: counted once
    ]
    await apply(coverage_app, bus, *later)

    national = (await client.get(COVERAGE)).json()
    nation = population.national
    assert national["as_of"] is not None
    assert [(r["prefecture"], r["dose_number"], r["count"], r["count_65_and_over"]) for r in national["rows"]] == [
        (None, 1, 2, 2),  # A and C
        (None, 2, 2, 1),  # A and B; A is 65+
    ]
    first = national["rows"][0]
    assert first["population"] == nation.population == 126_645_025
    assert first["population_65_and_over"] == nation.population_65_and_over == 35_767_994
    assert first["rate"] == pytest.approx(2 / 126_645_025)
    assert first["rate_65_and_over"] == pytest.approx(2 / 35_767_994)

    rows = (await client.get(COVERAGE, params={"prefecture": "13"})).json()["rows"]
    assert rows == [
        {
            "prefecture": "13",
            "population": tokyo.population,
            "population_65_and_over": tokyo.population_65_and_over,
            "dose_number": 1,
            "count": 1,
            "count_65_and_over": 1,
            "rate": 1 / tokyo.population,
            "rate_65_and_over": 1 / tokyo.population_65_and_over,
        },
        {
            "prefecture": "13",
            "population": tokyo.population,
            "population_65_and_over": tokyo.population_65_and_over,
            "dose_number": 2,
            "count": 2,
            "count_65_and_over": 1,
            "rate": 2 / tokyo.population,
            "rate_65_and_over": 1 / tokyo.population_65_and_over,
        },
    ]

    every = (await client.get(COVERAGE, params={"group_by": "prefecture"})).json()["rows"]
    assert len(every) == 47 * 2
    assert [r["prefecture"] for r in every[:4]] == ["01", "01", "02", "02"]
    assert (every[0]["count"], every[0]["count_65_and_over"], every[0]["population"]) == (1, 1, hokkaido.population)
    # The prefectures add up to the nation, people and population alike.
    for n in (1, 2):
        part = [r for r in every if r["dose_number"] == n]
        assert sum(r["count"] for r in part) == national["rows"][n - 1]["count"]
        assert sum(r["population"] for r in part) == nation.population


async def test_a_third_dose_adds_rows_and_empty_stats_still_answer_doses_1_and_2(
    coverage_app: FastAPI, client: httpx.AsyncClient, bus: BusSettings
) -> None:
    empty = (await client.get(COVERAGE)).json()
    assert empty["as_of"] is None
    assert [(r["dose_number"], r["count"], r["rate"]) for r in empty["rows"]] == [(1, 0, 0.0), (2, 0, 0.0)]
    await apply(coverage_app, bus, dose(DoseEventType.RECORDED, uuid.uuid4(), cell(dose_number=3)))
    rows = (await client.get(COVERAGE)).json()["rows"]
    assert [(r["dose_number"], r["count"]) for r in rows] == [(1, 0), (2, 0), (3, 1)]


@pytest.mark.parametrize(
    ("params", "field"),
    [({"prefecture": "48"}, "prefecture"), ({"prefecture": "1"}, "prefecture"), ({"group_by": "sex"}, "group_by")],
)
async def test_bad_parameters_name_the_field(client: httpx.AsyncClient, params: dict[str, str], field: str) -> None:
    response = await client.get(COVERAGE, params=params)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == field


async def test_without_the_population_table_coverage_says_why(stats_dsn: str, bus: BusSettings, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.csv"
    application = create_app(StatsSettings(main_dsn=stats_dsn, bus=bus, run_consumer=False, population_path=missing))
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application),
            base_url="http://stats.test",
            headers=internal_headers(Role.ANONYMOUS),
        ) as c,
    ):
        response = await c.get(COVERAGE)
        assert response.status_code == 503
        detail = response.json()["detail"]
        # The setting to fix, not the server's own path (that is in its log).
        assert "VRS_STATS_POPULATION_PATH" in detail and str(tmp_path) not in detail
        assert (await c.get("/api/v1/stats/doses")).status_code == 200  # counts do not depend on it
