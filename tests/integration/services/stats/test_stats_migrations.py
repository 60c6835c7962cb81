"""The migrations build exactly the tables the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection

from services.stats.models import MainBase
from shared.db import Database
from shared.migrations import downgrade, upgrade
from tests.integration.services.stats.conftest import MIGRATIONS


async def test_head_matches_the_models(stats_db: Database) -> None:
    def diff(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, MainBase.metadata))

    async with stats_db.engine.connect() as connection:
        assert await connection.run_sync(diff) == []


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        make_database: Callable[..., str] = request.getfixturevalue("make_database")
        return make_database("stats")
    return f"sqlite+aiosqlite:///{tmp_path / 'stats.db'}"


async def cells(database: Database) -> list[tuple[Any, ...]]:
    async with database.engine.connect() as connection:
        rows = await connection.execute(text("SELECT sex, age_band_10, count FROM dose_counts ORDER BY count"))
        return [tuple(r) for r in rows]


async def test_the_10_year_band_and_rollup_migrations_keep_every_count(empty_dsn: str) -> None:
    """Cells counted before the 10-year band existed become its UNK cells; going back folds the bands together."""
    await asyncio.to_thread(upgrade, empty_dsn, MIGRATIONS, "20261125_01")
    database = Database.connect(empty_dsn, pool_size=1)
    insert = text(
        "INSERT INTO dose_counts (date, prefecture, municipality, sex, age_band, medical_worker, dose_number, "
        "vaccine, count) VALUES ('2021-06-01', '13', '131016', 'F', '-64', false, 1, 'pfizer', 5)"
    )
    try:
        async with database.engine.begin() as connection:
            await connection.execute(insert)
        await asyncio.to_thread(upgrade, empty_dsn, MIGRATIONS, "20261125_02")
        assert await cells(database) == [("F", "UNK", 5)]
        async with database.engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO dose_counts (date, prefecture, municipality, sex, age_band, age_band_10, "
                    "medical_worker, dose_number, vaccine, count) "
                    "VALUES ('2021-06-01', '13', '131016', 'F', '-64', '30-39', false, 1, 'pfizer', 2)"
                )
            )
        await asyncio.to_thread(downgrade, empty_dsn, MIGRATIONS, "20261125_01")
        async with database.engine.connect() as connection:
            rows = (await connection.execute(text("SELECT sex, count FROM dose_counts"))).all()
        assert [tuple(r) for r in rows] == [("F", 7)]
        await asyncio.to_thread(upgrade, empty_dsn, MIGRATIONS, "head")
        # The rollups start out as the sums of the cells already counted.
        async with database.engine.connect() as connection:
            by_date = (await connection.execute(text("SELECT date, dose_number, count FROM dose_totals_by_date"))).all()
            version = (await connection.execute(text("SELECT version FROM aggregates_version"))).all()
        assert [(str(d), n, c) for d, n, c in by_date] == [("2021-06-01", 1, 7)]
        assert [tuple(v) for v in version] == [(0,)]
    finally:
        await database.engine.dispose()
