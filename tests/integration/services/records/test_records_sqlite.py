"""The dose path on SQLite (the embedded mode runs the same service code): record, replay, conflict, double
scan, a batch's second dose of one person, and the events written beside the doses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import date
from pathlib import Path

import pytest

from services.records.models import shard_assignments
from services.records.service import Submission
from shared.db import Databases, utcnow
from shared.errors import Conflict
from tests.integration.services.records.records_support import (
    CHIYODA,
    SAPPORO,
    TREES,
    count,
    dose,
    events_in,
    recorder,
)


@pytest.fixture
async def sqlite_databases(tmp_path: Path, migrated_sqlite: Callable[[Path, Path], str]) -> AsyncIterator[Databases]:
    urls = {
        name: migrated_sqlite(tmp_path / f"{name}.db", TREES / ("main" if name == "main" else "shard"))
        for name in ("main", "s0", "s1")
    }
    dbs = Databases.connect(urls["main"], {"s0": urls["s0"], "s1": urls["s1"]})
    async with dbs.main.sessionmaker() as session, session.begin():
        await session.execute(
            shard_assignments.insert(),
            [
                {"municipality_code": CHIYODA, "shard": "s0", "assigned_at": utcnow()},
                {"municipality_code": SAPPORO, "shard": "s1", "assigned_at": utcnow()},
            ],
        )
    yield dbs
    await dbs.dispose()


async def test_the_dose_path_on_sqlite(sqlite_databases: Databases) -> None:
    record = recorder(sqlite_databases)
    first, second, other_shard = await record(
        Submission(key="k1", dose=dose("0000000001")),
        Submission(key="k2", dose=dose("0000000001", dose_number=2, vaccinated_on=date(2021, 6, 22))),
        Submission(key="k3", dose=dose("0000000002", municipality=SAPPORO)),
    )
    assert [o.accepted.status if o.accepted else None for o in (first, second, other_shard)] == ["unmatched"] * 3
    [again] = await record(Submission(key="k1", dose=dose("0000000001")))
    assert again.accepted == first.accepted
    [conflict] = await record(Submission(key="k1", dose=dose("0000000003")))
    assert isinstance(conflict.error, Conflict)
    [scan] = await record(Submission(key="k4", dose=dose("0000000001", venue="二階")))
    assert scan.accepted is not None and first.accepted is not None
    assert (scan.accepted.status, scan.accepted.dose_id) == ("duplicate", first.accepted.dose_id)
    assert (await count(sqlite_databases, "s0"), await count(sqlite_databases, "s1")) == (2, 1)
    assert len(await events_in(sqlite_databases, "s0")) == 2


async def test_the_same_dose_under_two_keys_at_once_is_recorded_once_on_sqlite(sqlite_databases: Databases) -> None:
    """SQLite has no advisory locks: the shard's write lock, taken before the doses on file are read, makes
    the second request see the first's dose (a double scan), not record it again."""
    record = recorder(sqlite_databases)
    rounds = 8
    results = await asyncio.gather(
        *(record(Submission(key=f"{side}-{n}", dose=dose(f"{n:010d}"))) for n in range(1, rounds + 1) for side in "ab")
    )
    statuses = sorted(o.accepted.status if o.accepted else repr(o.error) for [o] in results)
    assert statuses == ["duplicate"] * rounds + ["unmatched"] * rounds
    assert await count(sqlite_databases, "s0") == rounds
    assert len(await events_in(sqlite_databases, "s0")) == rounds
