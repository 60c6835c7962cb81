"""Idempotency keys expire (services/records/housekeeping.py): claims and answers older than the window are
deleted, younger ones kept; a retry after its key is gone stores nothing twice; a shard being moved is left
alone; of several replicas one deletes at a time. On PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text, update

from services.records.app import create_app
from services.records.housekeeping import BATCH_ROWS, EXPIRY_LOCK, KEYS_EXPIRED, expire_keys
from services.records.models import IdempotencyClaim, IdempotencyKey, shard_moves
from services.records.schemas import CorrectionIn
from services.records.service import Submission
from shared.db import Database, Databases, delete_older, utcnow
from tests.factories import explained, run_sql, vrs_command
from tests.integration.services.records.records_support import (
    SAPPORO,
    correct,
    count,
    dose,
    events_in,
    recorder,
    serving_settings,
)

DAY = timedelta(days=1)


@pytest.fixture(params=["postgres", "sqlite"])
def any_databases(request: pytest.FixtureRequest) -> Databases:
    name = "databases" if request.param == "postgres" else "sqlite_databases"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


async def rows(db: Database, model: Any) -> list[str]:
    async with db.sessionmaker() as session:
        return sorted((await session.execute(select(model.key))).scalars())


async def age(databases: Databases, key: str, by: timedelta) -> None:
    """Make ``key``'s claim and answer ``by`` older."""
    places: list[tuple[Database, Any]] = [(databases.main, IdempotencyClaim.__table__)]
    places += [(shard, IdempotencyKey.__table__) for shard in databases.shards.values()]
    for db, table in places:
        async with db.sessionmaker() as session, session.begin():
            await session.execute(update(table).where(table.c.key == key).values(created_at=table.c.created_at - by))


async def keys_everywhere(databases: Databases) -> tuple[list[str], list[str], list[str]]:
    return (
        await rows(databases.main, IdempotencyClaim),
        await rows(databases.shards["s0"], IdempotencyKey),
        await rows(databases.shards["s1"], IdempotencyKey),
    )


async def test_keys_past_the_window_go_younger_ones_stay_and_a_late_retry_stores_nothing_twice(
    any_databases: Databases,
) -> None:
    databases = any_databases
    record = recorder(databases)
    [first] = await record(Submission(key="old-chiyoda", dose=dose("0000000001")))
    await record(Submission(key="old-sapporo", dose=dose("0000000002", municipality=SAPPORO)))
    await record(Submission(key="new-chiyoda", dose=dose("0000000003")))
    for key in ("old-chiyoda", "old-sapporo"):
        await age(databases, key, 31 * DAY)
    before = KEYS_EXPIRED.labels("main")._value.get()

    # One row a batch: every batch is its own transaction, and the pass goes on until a batch comes back short.
    done = await expire_keys(databases, before=utcnow() - 30 * DAY, batch_rows=1)
    assert (done.claims, done.keys, done.moving, done.total) == (2, {"s0": 1, "s1": 1}, [], 4)
    assert await keys_everywhere(databases) == (["new-chiyoda"], ["new-chiyoda"], [])
    assert KEYS_EXPIRED.labels("main")._value.get() - before == 2
    assert (await expire_keys(databases, before=utcnow() - 30 * DAY)).total == 0

    # The first dose sent again under its expired key: a new request, and the same dose as the one on file.
    assert first.accepted is not None and first.accepted.status == "unmatched"
    events = len(await events_in(databases, "s0"))
    [again] = await record(Submission(key="old-chiyoda", dose=dose("0000000001")))
    assert again.accepted is not None
    assert (again.accepted.status, again.accepted.dose_id) == ("duplicate", first.accepted.dose_id)
    assert await count(databases, "s0") == 2 and len(await events_in(databases, "s0")) == events
    # ... and its key is answered from now on as it was this time.
    [replayed] = await record(Submission(key="old-chiyoda", dose=dose("0000000001")))
    assert replayed.accepted == again.accepted

    # A dose the municipality voided meanwhile is not on file: the late retry records it again (README).
    [voided] = await record(Submission(key="voided", dose=dose("0000000004")))
    assert voided.accepted is not None
    await correct(databases, voided.accepted.dose_id, CorrectionIn(void=True, reason="recorded on the wrong coupon"))
    await age(databases, "voided", 31 * DAY)
    assert (await expire_keys(databases, before=utcnow() - 30 * DAY)).total == 2
    [late] = await record(Submission(key="voided", dose=dose("0000000004")))
    assert late.accepted is not None and late.accepted.status == "unmatched"
    assert late.accepted.dose_id != voided.accepted.dose_id


async def test_a_shard_a_move_is_under_way_for_keeps_its_keys_until_the_move_is_done(
    any_databases: Databases,
) -> None:
    databases = any_databases
    record = recorder(databases)
    await record(Submission(key="chiyoda", dose=dose("0000000001")))
    await record(Submission(key="sapporo", dose=dose("0000000002", municipality=SAPPORO)))
    async with databases.main.sessionmaker() as session, session.begin():
        await session.execute(
            shard_moves.insert().values(
                municipality_code=SAPPORO, from_shard="s1", to_shard="s0", state="fenced", started_at=utcnow()
            )
        )
    done = await expire_keys(databases, before=utcnow() + DAY)
    assert (done.claims, done.keys, sorted(done.moving)) == (2, {}, ["s0", "s1"])
    assert await keys_everywhere(databases) == ([], ["chiyoda"], ["sapporo"])

    async with databases.main.sessionmaker() as session, session.begin():
        await session.execute(update(shard_moves).values(state="done", finished_at=utcnow()))
    done = await expire_keys(databases, before=utcnow() + DAY)
    assert (done.keys, done.moving) == ({"s0": 1, "s1": 1}, [])
    assert await keys_everywhere(databases) == ([], [], [])


def command_env(databases: Databases) -> dict[str, str]:
    return {
        "VRS_RECORDS_MAIN_DSN": databases.main.url,
        "VRS_RECORDS_SHARD_DSNS": json.dumps({name: db.url for name, db in databases.shards.items()}),
    }


async def test_of_two_replicas_one_deletes_at_a_time(databases: Databases) -> None:
    record = recorder(databases)
    await record(Submission(key="chiyoda", dose=dose("0000000001")))
    await record(Submission(key="sapporo", dose=dose("0000000002", municipality=SAPPORO)))
    async with databases.main.sessionmaker() as session, session.begin():
        # Another replica's pass is under way in the main database.
        assert await session.scalar(text("SELECT pg_try_advisory_xact_lock(:lock)"), {"lock": EXPIRY_LOCK})
        done = await expire_keys(databases, before=utcnow() + DAY)
        assert (done.claims, done.keys, done.elsewhere) == (0, {"s0": 1, "s1": 1}, ["main"])
        # An operator's pass says so rather than "deleted 0".
        out = await vrs_command("doses", "expire-keys", "--once", env=command_env(databases))
        assert out.splitlines()[-1] == "another replica is deleting in main: left to it"
    done = await expire_keys(databases, before=utcnow() + DAY)
    assert (done.claims, done.keys, done.elsewhere) == (2, {"s0": 0, "s1": 0}, [])


async def test_records_expires_keys_in_the_background(databases: Databases) -> None:
    await recorder(databases)(Submission(key="chiyoda", dose=dose("0000000001")))
    await age(databases, "chiyoda", 3 * DAY)
    settings = serving_settings(databases, idempotency_keep_days=2, key_expiry_seconds=0.05)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        for _ in range(200):
            if await keys_everywhere(databases) == ([], [], []):
                break
            await asyncio.sleep(0.05)
    assert await keys_everywhere(databases) == ([], [], [])


async def test_vrs_doses_expire_keys_once(any_databases: Databases) -> None:
    """The command an operator runs (or a worker of its own, with the API replicas' interval 0)."""
    databases = any_databases
    record = recorder(databases)
    await record(Submission(key="old", dose=dose("0000000001")))
    await record(Submission(key="new", dose=dose("0000000002", municipality=SAPPORO)))
    await age(databases, "old", 31 * DAY)
    out = await vrs_command("doses", "expire-keys", "--once", env=command_env(databases))
    assert out == "deleted 1 claims and 1 answers (1 in s0, 0 in s1) older than 30 days\n"
    assert await keys_everywhere(databases) == (["new"], [], ["new"])


async def test_a_pass_finds_old_keys_through_the_age_index_not_a_scan(databases: Databases) -> None:
    """On a table of many keys, the expiry's statement reads the BRIN index (a few of its ranges) and deletes by
    address, never reading the whole table: what keeps a pass cheap at a country's volume."""
    await run_sql(
        databases.main,
        "INSERT INTO idempotency_claims (scope, key, request_hash, shard, created_at) "
        "SELECT 'institution:1312345678', 'k' || n, 'h', 's0', "
        "       now() - interval '60 days' + n * interval '1 second' "
        "  FROM generate_series(1, 200000) AS n",
    )
    # The statement KeyExpiryRepository.delete_created_before runs.
    before = utcnow() - 60 * DAY + timedelta(seconds=10_000)  # the oldest 5 %: a pass's usual share
    claims: Any = IdempotencyClaim.__table__
    stmt = delete_older(claims, claims.c.created_at, before, limit=BATCH_ROWS, dialect="postgresql")
    plan = await explained(databases.main, "idempotency_claims", stmt)
    assert "Bitmap Index Scan on ix_idempotency_claims_created" in plan, plan
    assert "Tid Scan on idempotency_claims" in plan and "Seq Scan" not in plan, plan
