"""The dose path on SQLite (the embedded mode runs the same service code): record, replay, conflict, double
scan, a batch's second dose of one person, and the events written beside the doses."""

from __future__ import annotations

import asyncio
from datetime import date

from services.records.service import Submission
from shared.db import Databases
from shared.errors import Conflict
from tests.integration.services.records.records_support import (
    SAPPORO,
    count,
    dose,
    events_in,
    recorder,
)


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
