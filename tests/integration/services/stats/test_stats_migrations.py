"""The migrations build exactly the tables the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from services.stats.models import MainBase
from shared.db import Database


async def test_head_matches_the_models(stats_db: Database) -> None:
    def diff(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, MainBase.metadata))

    async with stats_db.engine.connect() as connection:
        assert await connection.run_sync(diff) == []
