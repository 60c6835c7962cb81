"""The shard map as the services read it: many municipalities in one query, cached for its TTL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from shared.db import Databases
from shared.migrations import upgrade

TREES = Path(__file__).resolve().parents[3] / "services" / "records" / "migrations"
CODES = ["131016", "011002", "271004", "401307", "473014"]


@pytest.fixture
async def databases(tmp_path: Path) -> AsyncIterator[Databases]:
    main = f"sqlite+aiosqlite:///{tmp_path / 'main.db'}"
    await asyncio.to_thread(upgrade, main, TREES / "main")
    dbs = Databases.connect(main, {"s0": f"sqlite+aiosqlite:///{tmp_path / 's0.db'}", "s1": "sqlite+aiosqlite://"})
    yield dbs
    await dbs.dispose()


def count_queries(dbs: Databases) -> list[str]:
    seen: list[str] = []

    @event.listens_for(dbs.main.engine.sync_engine, "before_cursor_execute")
    def _count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    return seen


async def test_shards_of_many_municipalities_is_one_read_then_cached(databases: Databases) -> None:
    queries = count_queries(databases)
    shards = await databases.shards_of(CODES + CODES[:2])
    assert shards == {c: databases.default_shard(c) for c in CODES}
    assert set(shards.values()) == {"s0", "s1"}  # these five spread over both shards
    first_read = len(queries)
    # the whole map, then for the ones not in it: read, assign, read back; whatever the number of codes
    assert first_read <= 4
    assert await databases.shards_of(CODES) == shards
    assert {c: await databases.shard_of(c) for c in CODES} == shards
    assert len(queries) == first_read  # all from the cache


async def test_shards_of_reads_the_map_again_after_its_ttl(databases: Databases) -> None:
    databases.shard_map_ttl = 0.05
    await databases.shards_of(CODES)
    queries = count_queries(databases)
    await asyncio.sleep(0.1)
    await databases.shards_of(CODES)
    assert [q for q in queries if q.lstrip().upper().startswith("SELECT")], "a stale entry must be read again"


async def test_one_stale_municipality_reads_the_whole_map_once_for_all_waiting(databases: Databases) -> None:
    """Doses come from every municipality: one read refreshes every entry, and concurrent misses share it."""
    databases.shard_map_ttl = 0.05
    shards = await databases.shards_of(CODES)
    await asyncio.sleep(0.1)  # every entry stale
    queries = count_queries(databases)
    answers = await asyncio.gather(*(databases.shard_of(code) for code in CODES * 4))
    assert answers == [shards[code] for code in CODES * 4]
    assert len(queries) == 1, queries  # one read of the whole map for twenty lookups of five municipalities
    assert "WHERE" not in queries[0].upper()
