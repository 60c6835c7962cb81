"""Records' shard migrations leave exactly the dose write's checks that a running release calls: this release's
and the one before's. Older ones are dropped, and come back on a downgrade. Statistics are built only for the
columns records' statements filter, join or order by."""

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


# What the planner is told about, per table: every column a statement of records filters, joins or orders by.
QUERIED = {
    "doses": {
        "dose_id", "municipality_code", "coupon_number", "dose_number", "vaccinated_on", "status", "voided",
        "recorded_at",
    },
    "idempotency_keys": {"scope", "key", "created_at"},
    "idempotency_claims": {"scope", "key", "created_at"},
}  # fmt: skip


async def statistics_targets(url: str, table: str) -> dict[str, int]:
    """Each column's statistics target: -1 the server's default, 0 none."""
    database = Database.connect(url, pool_size=1)
    try:
        async with database.engine.connect() as connection:
            rows = await connection.execute(
                text(
                    "SELECT attname, coalesce(attstattarget, -1) FROM pg_attribute "
                    "WHERE attrelid = CAST(:table AS regclass) AND attnum > 0 AND NOT attisdropped"
                ),
                {"table": table},
            )
            return {name: int(target) for name, target in rows}
    finally:
        await database.engine.dispose()


@pytest.mark.parametrize(("tree", "table", "before"), [
    ("shard", "doses", "20261127_04"), ("shard", "idempotency_keys", "20261127_04"),
    ("main", "idempotency_claims", "20261125_11"),
])  # fmt: skip
async def test_statistics_are_built_only_for_the_columns_queried(
    make_database: Callable[..., str], tree: str, table: str, before: str
) -> None:
    url = make_database(f"records_{tree}")
    await asyncio.to_thread(upgrade, url, TREES / tree)
    targets = await statistics_targets(url, table)
    assert QUERIED[table] < set(targets)
    assert {column for column, target in targets.items() if target != 0} == QUERIED[table]
    assert all(targets[column] == -1 for column in QUERIED[table])
    await asyncio.to_thread(downgrade, url, TREES / tree, before)
    assert set((await statistics_targets(url, table)).values()) == {-1}
