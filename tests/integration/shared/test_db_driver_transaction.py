"""``Database.driver_transaction``: a transaction on the pooled asyncpg connection itself (the outbox relay's
pass). Committed on exit, rolled back when its body raises, and a connection lost or left in a transaction is
never handed out again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from shared.db import Database

pytestmark = pytest.mark.postgres


@pytest.fixture
async def database(make_database: Callable[..., str]) -> AsyncIterator[Database]:
    db = Database.connect(make_database("driver_transaction"), pool_size=1)  # every test reuses one connection
    async with db.driver_transaction() as conn:
        await conn.execute("CREATE TABLE notes (id integer PRIMARY KEY)")
    yield db
    await db.engine.dispose()


async def ids(db: Database) -> list[int]:
    async with db.driver_transaction() as conn:
        return [row[0] for row in await conn.fetch("SELECT id FROM notes ORDER BY id")]


async def test_the_body_is_committed_and_the_begin_statements_hold_inside(database: Database) -> None:
    async with database.driver_transaction("BEGIN; SET LOCAL enable_bitmapscan = off") as conn:
        assert await conn.fetchval("SHOW enable_bitmapscan") == "off"
        await conn.execute("INSERT INTO notes VALUES (1), (2)")
    assert await ids(database) == [1, 2]
    async with database.driver_transaction() as conn:  # SET LOCAL ended with its transaction
        assert await conn.fetchval("SHOW enable_bitmapscan") == "on"


async def test_a_body_that_raises_stores_nothing_and_the_connection_serves_on(database: Database) -> None:
    with pytest.raises(ConnectionError):
        async with database.driver_transaction() as conn:
            await conn.execute("INSERT INTO notes VALUES (1)")
            raise ConnectionError("the bus refused the batch")
    with pytest.raises(Exception, match="duplicate key"):
        async with database.driver_transaction() as conn:
            await conn.execute("INSERT INTO notes VALUES (2), (2)")
    assert await ids(database) == []
    pid = await _backend(database)
    async with database.driver_transaction() as conn:
        await conn.execute("INSERT INTO notes VALUES (3)")
    assert await ids(database) == [3] and await _backend(database) == pid  # the same connection, back in the pool


async def test_a_lost_connection_is_replaced_not_reused(database: Database) -> None:
    pid = await _backend(database)
    with pytest.raises(Exception, match="terminating connection"):
        async with database.driver_transaction() as conn:
            await conn.execute("INSERT INTO notes VALUES (1)")
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")  # as a server restart would
    async with database.driver_transaction() as conn:
        await conn.execute("INSERT INTO notes VALUES (2)")
    assert await ids(database) == [2] and await _backend(database) != pid


async def test_a_cancelled_body_leaves_no_transaction_behind(database: Database) -> None:
    started = asyncio.Event()

    async def slow() -> None:
        async with database.driver_transaction() as conn:
            await conn.execute("INSERT INTO notes VALUES (1)")
            started.set()
            await conn.execute("SELECT pg_sleep(30)")

    task = asyncio.create_task(slow())
    await started.wait()
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with database.driver_transaction() as conn:
        assert await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'") == 0
        await conn.execute("INSERT INTO notes VALUES (2)")
    assert await ids(database) == [2]


async def _backend(db: Database) -> int:
    async with db.driver_transaction() as conn:
        return int(await conn.fetchval("SELECT pg_backend_pid()"))
