"""Fixtures for stats: a migrated database (SQLite, or PostgreSQL from the harness) and a real event bus."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from services.stats.app import create_app
from services.stats.models import LIVE
from services.stats.repository import ConsumerRepository
from services.stats.settings import StatsSettings
from shared.auth import Role
from shared.db import Database
from shared.events import StatsCell
from shared.settings import BusSettings
from tests.factories import AddCells, internal_headers

MIGRATIONS = Path(__file__).resolve().parents[4] / "services" / "stats" / "migrations" / "main"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def stats_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh stats database at the head migration."""
    if request.param == "postgres":
        make_database: Callable[..., str] = request.getfixturevalue("make_database")
        return make_database("stats", MIGRATIONS)
    migrated_sqlite: Callable[[Path, Path], str] = request.getfixturevalue("migrated_sqlite")
    return migrated_sqlite(tmp_path / "stats.db", MIGRATIONS)


@pytest.fixture
async def stats_db(stats_dsn: str) -> AsyncIterator[Database]:
    database = Database.connect(stats_dsn, pool_size=5)
    try:
        yield database
    finally:
        await database.engine.dispose()


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def any_bus(request: pytest.FixtureRequest, tmp_path: Path) -> BusSettings:
    """A fresh topic on the embedded log or on the session's Kafka broker (for the tests that must hold on both)."""
    topic = f"stats-{uuid.uuid4().hex[:12]}"
    if request.param == "kafka":
        kafka = request.getfixturevalue("kafka_server")
        return BusSettings(kind="kafka", topic=topic, partitions=3, kafka_bootstrap_servers=kafka.bootstrap_servers)
    return BusSettings(kind="embedded", topic=topic, partitions=3, embedded_path=tmp_path / "events.db")


@pytest.fixture
def bus(tmp_path: Path) -> BusSettings:
    """A fresh topic on the embedded log: the real bus of the embedded mode."""
    return BusSettings(kind="embedded", topic="dose-events", partitions=3, embedded_path=tmp_path / "events.db")


@pytest.fixture
async def app(stats_dsn: str, bus: BusSettings) -> AsyncIterator[FastAPI]:
    """The stats app on a fresh database, its consumer off: tests put counts in with ``add_cells``."""
    application = create_app(StatsSettings(main_dsn=stats_dsn, bus=bus, run_consumer=False))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
def database(app: FastAPI) -> Database:
    db: Database = app.state.databases.main
    return db


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    # Every request carries an internal token, as through the gateway; anonymous unless a test says otherwise.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://stats.test", headers=internal_headers(Role.ANONYMOUS)
    ) as c:
        yield c


async def assert_rollups_match(database: Database) -> None:
    """Every rollup holds exactly the cells' sums over its dimensions (zero rows aside)."""
    cells = LIVE.counts
    async with database.sessionmaker() as session:
        for table in LIVE.rollups:
            dims = [column.name for column in table.primary_key.columns]
            summed = select(*(cells.c[d] for d in dims), func.sum(cells.c["count"])).group_by(
                *(cells.c[d] for d in dims)
            )
            expected = {tuple(r[:-1]): int(r[-1]) for r in (await session.execute(summed)).all() if r[-1]}
            stored = select(*(table.c[d] for d in dims), table.c["count"]).where(table.c["count"] != 0)
            assert {tuple(r[:-1]): int(r[-1]) for r in (await session.execute(stored)).all()} == expected, table.name


@pytest.fixture
def add_cells(database: Database) -> AddCells:
    """``await add_cells({cell: delta, ...})``: change counts as the consumer would, in one transaction."""

    async def add(deltas: Mapping[StatsCell, int]) -> None:
        async with database.sessionmaker() as session, session.begin():
            await ConsumerRepository(session).add_to_counts(deltas)

    return add
