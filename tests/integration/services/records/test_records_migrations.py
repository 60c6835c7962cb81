"""Records' shard migrations leave exactly the dose write's checks that a running release calls: this release's
and the one before's. Older ones are dropped, and come back on a downgrade."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from sqlalchemy import text

from services.records.repository import _RECORD_PG
from shared.db import Database
from shared.migrations import downgrade, upgrade
from tests.integration.services.records.records_support import TREES

pytestmark = pytest.mark.usefixtures("pg_server")
SHARD = TREES / "shard"
CHECKS = ("records_doses_unchanged", "records_writes_unchanged", "records_writes_current", "records_writes_as_read")


async def checks_in(url: str) -> set[str]:
    database = Database.connect(url, pool_size=1)
    try:
        async with database.engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT proname FROM pg_proc WHERE proname = ANY(:names)"), {"names": list(CHECKS)}
            )
            return {name for (name,) in rows}
    finally:
        await database.engine.dispose()


async def test_only_the_checks_of_this_release_and_the_one_before_are_left(make_database: Callable[..., str]) -> None:
    url = make_database("records_shard")
    await asyncio.to_thread(upgrade, url, SHARD)
    assert "records_writes_as_read(" in _RECORD_PG  # what this release calls
    assert await checks_in(url) == {"records_writes_as_read", "records_writes_current"}
    await asyncio.to_thread(downgrade, url, SHARD, "20261127_03")
    assert await checks_in(url) == set(CHECKS)
    await asyncio.to_thread(upgrade, url, SHARD)
    assert await checks_in(url) == {"records_writes_as_read", "records_writes_current"}
