"""``shared.db.upsert_many``: many rows in one upsert, the same answers on SQLite (executemany) and PostgreSQL
(one ``INSERT … SELECT unnest(…)``), whatever the column types and however many rows."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import BigInteger, Boolean, Column, Date, MetaData, SmallInteger, String, Table, Uuid, select

from shared.db import Database, upsert_many

metadata = MetaData()
cells = Table(
    "cells",
    metadata,
    Column("day", Date, primary_key=True),
    Column("area", String(6), primary_key=True),
    Column("worker", Boolean, primary_key=True),
    Column("dose", SmallInteger, primary_key=True),
    Column("count", BigInteger, nullable=False),
)
seen = Table("seen", metadata, Column("id", Uuid, primary_key=True), Column("part", SmallInteger))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "postgres":
        make_database: Callable[..., str] = request.getfixturevalue("make_database")
        dsn = make_database("upsert")
    else:
        dsn = f"sqlite+aiosqlite:///{tmp_path / 'upsert.db'}"
    db = Database.connect(dsn, pool_size=2)
    async with db.engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield db
    await db.engine.dispose()


async def add(db: Database, rows: list[dict[str, Any]]) -> None:
    async with db.sessionmaker() as session, session.begin():
        stmt, params = upsert_many(session, cells, rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=["day", "area", "worker", "dose"], set_={"count": cells.c["count"] + stmt.excluded["count"]}
        )
        await session.execute(stmt, params)


async def test_rows_are_inserted_and_conflicts_add_up(database: Database) -> None:
    day = date(2021, 6, 30)
    first = [{"day": day, "area": f"{n:06d}", "worker": n % 2 == 0, "dose": 1 + n % 3, "count": n} for n in range(300)]
    await add(database, first)
    await add(database, [{"day": day, "area": "000007", "worker": False, "dose": 2, "count": 5}])  # a conflict
    await add(database, [{"day": day, "area": "999999", "worker": True, "dose": 1, "count": 1}])  # one row
    async with database.sessionmaker() as session:
        rows = (await session.execute(select(cells))).mappings().all()
        got = {(r["area"], r["worker"], r["dose"]): r["count"] for r in rows}
    assert len(got) == 301
    assert got[("000007", False, 2)] == 7 + 5
    assert got[("000010", True, 2)] == 10
    assert got[("999999", True, 1)] == 1


async def test_returning_answers_only_the_rows_that_were_new(database: Database) -> None:
    old, new = uuid.uuid4(), uuid.uuid4()

    async def claim(ids: list[uuid.UUID]) -> set[uuid.UUID]:
        async with database.sessionmaker() as session, session.begin():
            stmt, params = upsert_many(session, seen, [{"id": i, "part": 3} for i in ids])
            stmt = stmt.on_conflict_do_nothing(index_elements=["id"]).returning(seen.c.id)
            return set((await session.execute(stmt, params)).scalars())

    assert await claim([old]) == {old}
    assert await claim([old, new]) == {new}
    assert await claim([old, new]) == set()
