"""The idempotent consumer's own rows, written through a session (``Bookkeeping``, both databases) or on the
batch transaction's asyncpg connection (``DriverBookkeeping``, PostgreSQL): the same answers either way, with
and without the read positions."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import pytest
from sqlalchemy import MetaData, Table, select

from shared.consumer import Bookkeeping, DriverBookkeeping, consumer_tables
from shared.db import Database, utcnow

pytestmark = pytest.mark.postgres

Tables = tuple[Table, Table]


class Rows:
    """One way of writing the bookkeeping, each call in a transaction of its own."""

    def __init__(self, db: Database, tables: Tables, driver: bool) -> None:
        self.db, self.tables, self.driver = db, tables, driver

    @contextlib.asynccontextmanager
    async def _book(self) -> AsyncIterator[Bookkeeping | DriverBookkeeping]:
        if self.driver:
            async with self.db.driver_transaction() as connection:
                yield DriverBookkeeping(connection, self.tables)
        else:
            async with self.db.sessionmaker() as session, session.begin():
                yield Bookkeeping(session, self.tables)

    async def claim(self, ids: Sequence[uuid.UUID] | Mapping[uuid.UUID, tuple[int, int]]) -> set[uuid.UUID]:
        async with self._book() as book:
            return await book.claim("c", ids, at=utcnow())

    async def store(self, positions: dict[int, int]) -> None:
        async with self._book() as book:
            await book.store_offsets("c", "t", positions, at=utcnow())


@pytest.fixture(params=["positions", "ids alone"])
async def tables(
    request: pytest.FixtureRequest, make_database: Callable[..., str]
) -> AsyncIterator[tuple[Database, Tables]]:
    metadata = MetaData()
    both = consumer_tables(metadata, positions=request.param == "positions")
    db = Database.connect(make_database("bookkeeping"), pool_size=2)
    async with db.engine.begin() as connection:
        await connection.run_sync(metadata.drop_all)
        await connection.run_sync(metadata.create_all)
    yield db, both
    await db.engine.dispose()


@pytest.mark.parametrize("driver", [False, True], ids=["session", "driver"])
async def test_claims_answer_the_new_ids_once_and_offsets_never_go_back(
    tables: tuple[Database, Tables], driver: bool
) -> None:
    db, (processed, offsets) = tables
    rows = Rows(db, (processed, offsets), driver)
    a, b, c = (uuid.uuid4() for _ in range(3))
    assert await rows.claim({a: (0, 5), b: (1, 7)}) == {a, b}
    assert await rows.claim({b: (1, 7), c: (2, 9)}) == {c}  # b again: a repeat
    assert await rows.claim([]) == set()
    await rows.store({0: 6, 1: 8})
    await rows.store({0: 3, 2: 10})  # a member that lost partition 0 meanwhile: 0 stays at 6
    async with db.engine.connect() as connection:
        stored = dict((await connection.execute(select(offsets.c.partition, offsets.c.next_offset))).all())
        kept = (await connection.execute(select(processed))).mappings().all()
    assert stored == {0: 6, 1: 8, 2: 10}
    assert {row["event_id"] for row in kept} == {a, b, c}
    if "event_offset" in processed.c:
        assert {row["event_id"]: (row["event_partition"], row["event_offset"]) for row in kept} == {
            a: (0, 5),
            b: (1, 7),
            c: (2, 9),
        }
