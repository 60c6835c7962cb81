"""``ANALYZE`` builds statistics only for the columns a service's statements filter, join or order by, on the tables
written on every dose request (records' doses, keys and claims, the gateway's audit trail); a downgrade gives every
column its default again. A new statement on another column must add it here, and to its migration."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from sqlalchemy import text

from shared.db import Database
from shared.migrations import SERVICES_DIR, downgrade, upgrade

pytestmark = pytest.mark.usefixtures("pg_server")

# (service, tree, table, the revision before statistics were trimmed): what the planner is told about.
QUERIED = {
    ("records", "shard", "doses", "20261127_04"): {
        "dose_id", "municipality_code", "coupon_number", "dose_number", "vaccinated_on", "status", "voided",
        "recorded_at",
    },
    ("records", "shard", "idempotency_keys", "20261127_04"): {"scope", "key", "created_at"},
    ("records", "main", "idempotency_claims", "20261125_11"): {"scope", "key", "created_at"},
    ("gateway", "main", "audit_trail", "20261125_02"): {
        "instance", "seq", "recorded_at", "municipality", "caller_municipality",
    },
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


@pytest.mark.parametrize(("service", "tree", "table", "before"), list(QUERIED), ids=lambda v: str(v))
async def test_statistics_are_built_only_for_the_columns_queried(
    make_database: Callable[..., str], service: str, tree: str, table: str, before: str
) -> None:
    queried = QUERIED[(service, tree, table, before)]
    location = SERVICES_DIR / service / "migrations" / tree
    url = make_database(f"{service}_{tree}")
    await asyncio.to_thread(upgrade, url, location)
    targets = await statistics_targets(url, table)
    assert queried < set(targets)
    assert {column for column, target in targets.items() if target != 0} == queried
    assert all(targets[column] == -1 for column in queried)
    await asyncio.to_thread(downgrade, url, location, before)
    assert set((await statistics_targets(url, table)).values()) == {-1}
