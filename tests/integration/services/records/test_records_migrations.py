"""Records' shard migrations leave exactly the dose write's checks that a running release calls: this release's
and the one before's. Older ones are dropped, and come back on a downgrade."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from services.records.repository import _RECORD_PG
from shared.db import Database
from shared.migrations import downgrade, upgrade
from shared.shardmove import fenced_municipality
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


# One member writing on one coupon of CHIYODA, nothing read: each release's call of its check.
CALLS = {
    "records_writes_as_read": "SELECT records_writes_as_read(1, '{1}', '{0}', '{131016}', '{0000000001}', '{0}', "
    "'{}', '{}', '{}', '{}', '{}', '{}')",
    "records_writes_current": "SELECT records_writes_current(1, '{1}', '{0}', '{131016}', '{0000000001}', '{0}', "
    "'{}', '{}', '{}', '{}', '{}')",
}


async def test_the_checks_of_both_releases_refuse_a_fenced_municipality(make_database: Callable[..., str]) -> None:
    """A write of only keys (a double scan) has no row the fence triggers see: the check refuses it, for the
    processes of this release and of the one before, as the triggers refuse the municipality's other writes."""
    url = make_database("records_shard")
    await asyncio.to_thread(upgrade, url, SHARD)
    database = Database.connect(url, pool_size=1)
    try:
        for name, call in CALLS.items():
            async with database.engine.connect() as connection:
                assert (await connection.execute(text(call))).scalar_one() == [0], name  # not fenced: it passes
        async with database.engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO shard_fences (municipality_code, moving_to, fenced_at) VALUES ('131016', 's1', now())"
                )
            )
        for name, call in CALLS.items():
            async with database.engine.connect() as connection:
                with pytest.raises(DBAPIError) as refused:
                    await connection.execute(text(call))
            assert fenced_municipality(refused.value) == "131016", name
        # A downgrade puts back the checks as they were.
        await asyncio.to_thread(downgrade, url, SHARD, "20261127_05")
        for name, call in CALLS.items():
            async with database.engine.connect() as connection:
                assert (await connection.execute(text(call))).scalar_one() == [0], name
    finally:
        await database.engine.dispose()
