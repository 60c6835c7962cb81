"""The shared outbox relay on a real shard database (records' tree): publishes, marks, survives a bus failure,
purges."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, date, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.records.models import outbox
from shared.bus import OutgoingMessage
from shared.bus.embedded import EmbeddedLog
from shared.db import Databases, utcnow
from shared.events import DoseEvent
from shared.outbox import (
    CLAIM_BEGIN,
    OutboxNotifier,
    OutboxRelay,
    OutboxRepository,
    claim_and_mark_sql,
    claim_statement,
    sample_backlog,
)
from shared.settings import BusSettings
from tests.factories import recorded

TREES = Path(__file__).resolve().parents[3] / "services" / "records" / "migrations"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Databases]:
    if request.param == "postgres":
        make_database: Callable[..., str] = request.getfixturevalue("make_database")
        main, shard = make_database("records_main", TREES / "main"), make_database("records_s0", TREES / "shard")
    else:
        migrated_sqlite: Callable[[Path, Path], str] = request.getfixturevalue("migrated_sqlite")
        main, shard = (
            migrated_sqlite(tmp_path / "main.db", TREES / "main"),
            migrated_sqlite(tmp_path / "s0.db", TREES / "shard"),
        )
    dbs = Databases.connect(main, {"s0": shard}, pool_size=5)
    yield dbs
    await dbs.dispose()


async def write_outbox(dbs: Databases, n: int) -> list[DoseEvent]:
    events = [recorded(date=date(2021, 6, 1) + timedelta(days=i % 5)) for i in range(n)]
    async with dbs.shards["s0"].sessionmaker() as session, session.begin():
        await OutboxRepository(session, outbox).add(events)
    return events


class FlakyBus:
    """A real embedded log that refuses the first ``failures`` publishes, as Kafka does during an outage."""

    def __init__(self, log: EmbeddedLog, failures: int) -> None:
        self.log, self.failures = log, failures

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker unavailable")
        await self.log.publish(messages)

    async def close(self) -> None:
        await self.log.close()


class Collect:
    """A bus that keeps what each publish carried, and when it came."""

    def __init__(self) -> None:
        self.publishes: list[tuple[float, list[bytes]]] = []

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        self.publishes.append((time.monotonic(), [m.value for m in messages]))

    def values(self) -> list[bytes]:
        return [value for _, values in self.publishes for value in values]

    async def close(self) -> None:
        pass


async def read_all(log: EmbeddedLog) -> list[DoseEvent]:
    await log.assign(dict.fromkeys(await log.partitions(), 0))
    return [DoseEvent.from_bytes(m.value) for m in await log.poll(max_records=10_000, timeout=0.1)]


async def test_relay_publishes_each_event_and_marks_it(databases: Databases, tmp_path: Path) -> None:
    log = EmbeddedLog(BusSettings(embedded_path=tmp_path / "log.db", partitions=3))
    events = await write_outbox(databases, 7)
    relay = OutboxRelay(databases, log, outbox, topic="dose-events", batch_size=3, idle_seconds=0.05)
    assert await relay.drain() == 7
    assert await relay.drain() == 0
    assert sorted(e.event_id for e in await read_all(log)) == sorted(e.event_id for e in events)


async def test_events_wait_in_the_outbox_while_the_bus_is_down(databases: Databases, tmp_path: Path) -> None:
    log = EmbeddedLog(BusSettings(embedded_path=tmp_path / "log.db", partitions=3))
    events = await write_outbox(databases, 4)
    relay = OutboxRelay(
        databases, FlakyBus(log, failures=2), outbox, topic="dose-events", batch_size=100, idle_seconds=0.05
    )
    task = asyncio.create_task(relay.run())
    try:
        for _ in range(200):
            if len(await read_all(log)) == 4:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
    assert sorted(e.event_id for e in await read_all(log)) == sorted(e.event_id for e in events)


async def test_purge_drops_only_old_published_events(databases: Databases, tmp_path: Path) -> None:
    log = EmbeddedLog(BusSettings(embedded_path=tmp_path / "log.db", partitions=3))
    await write_outbox(databases, 3)
    relay = OutboxRelay(
        databases, log, outbox, topic="dose-events", batch_size=100, idle_seconds=0.05, retention=timedelta(hours=1)
    )
    await relay.drain()
    await write_outbox(databases, 2)  # not published yet: must survive any purge
    async with databases.shards["s0"].sessionmaker() as session, session.begin():
        repo = OutboxRepository(session, outbox)
        assert await repo.purge_published(utcnow() - timedelta(hours=1)) == 0
        assert await repo.purge_published(utcnow() + timedelta(seconds=1)) == 3
    async with databases.shards["s0"].sessionmaker() as session:
        rows = (await session.execute(outbox.select())).all()
    assert len(rows) == 2


async def test_backlog_counts_what_waits_and_since_when(databases: Databases, tmp_path: Path) -> None:
    """What /metrics reports as vrs_outbox_backlog_events and vrs_outbox_oldest_unpublished_seconds."""

    def sample(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"service": "test-backlog", "shard": "s0"})

    await sample_backlog("test-backlog", databases, outbox)
    assert sample("vrs_outbox_backlog_events") == 0 and sample("vrs_outbox_oldest_unpublished_seconds") == 0
    events = await write_outbox(databases, 4)
    async with databases.shards["s0"].sessionmaker() as session:
        count, oldest = await OutboxRepository(session, outbox).backlog()
    assert count == 4 and oldest is not None
    assert oldest.replace(tzinfo=oldest.tzinfo or UTC) == min(e.occurred_at for e in events)
    await sample_backlog("test-backlog", databases, outbox)
    age = sample("vrs_outbox_oldest_unpublished_seconds")
    assert sample("vrs_outbox_backlog_events") == 4 and age is not None and 0 <= age < 60
    log = EmbeddedLog(BusSettings(embedded_path=tmp_path / "log.db", partitions=3))
    await OutboxRelay(databases, log, outbox, topic="dose-events", batch_size=10, idle_seconds=0.05).drain()
    await sample_backlog("test-backlog", databases, outbox)
    assert sample("vrs_outbox_backlog_events") == 0 and sample("vrs_outbox_oldest_unpublished_seconds") == 0


async def test_passes_are_paced_by_the_linger_and_a_quiet_relay_publishes_at_once(databases: Databases) -> None:
    """A pass starts no sooner than ``linger_seconds`` after the last one that published something ended:
    commits arriving meanwhile go out together in the next pass (under load, fewer and fuller publishes), while
    the first commit after a quiet spell is published at once, without waiting for one."""
    linger = 1.0
    bus = Collect()
    publishes = bus.publishes
    relay = OutboxRelay(
        databases, bus, outbox, topic="dose-events", batch_size=100, idle_seconds=60, linger_seconds=linger
    )
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.sleep(0.5)  # the looks at start are over (they found nothing, so they pace nothing)
        await write_outbox(databases, 1)
        woken = time.monotonic()
        relay.wake("s0")
        while not publishes:
            assert time.monotonic() - woken < linger * 0.6, "the first commit after a quiet spell waited"
            await asyncio.sleep(0.01)
        for _ in range(3):  # a trickle right after that pass: within the linger
            await write_outbox(databases, 1)
            relay.wake("s0")
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 10
        while len(bus.values()) < 4:
            assert time.monotonic() < deadline, publishes
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [len(values) for _, values in publishes] == [1, 3]
    assert publishes[1][0] - publishes[0][0] >= linger * 0.9  # paced (the first pass ended after its publish)


@pytest.mark.postgres
async def test_a_writer_in_another_process_wakes_an_idle_relay_by_notify(make_database: Callable[..., str]) -> None:
    """The production layout: the relay runs in a process of its own and looks by itself only every
    ``idle_seconds`` (here a minute); a writer's notifier wakes it within a fraction of a second, however many
    commits it announces, and a shard database has no trigger that notifies inside the writing transaction."""
    main, shard = make_database("records_main", TREES / "main"), make_database("records_s0", TREES / "shard")
    writer, relay_side = (Databases.connect(main, {"s0": shard}, pool_size=2) for _ in range(2))
    bus = Collect()
    relay = OutboxRelay(relay_side, bus, outbox, topic="dose-events", batch_size=100, idle_seconds=60)
    task = asyncio.create_task(relay.run())
    notifier = OutboxNotifier(writer, min_interval=0.01)
    try:
        async with writer.shards["s0"].engine.connect() as conn:
            triggers = await conn.exec_driver_sql(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'outbox'::regclass AND tgname LIKE '%%notify%%'"
            )
            assert [r[0] for r in triggers] == []
        await asyncio.sleep(0.5)  # the relay's first look (at start) is over; it now waits for a minute
        events = []
        for _ in range(20):
            events += await write_outbox(writer, 3)
            notifier.wake("s0")
        for _ in range(100):
            if len(bus.values()) == len(events):
                break
            await asyncio.sleep(0.02)
        assert sorted(DoseEvent.from_bytes(v).event_id for v in bus.values()) == sorted(e.event_id for e in events)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await notifier.close()
        await writer.dispose()
        await relay_side.dispose()


async def test_the_relay_claim_reads_the_unpublished_rows_alone(databases: Databases, tmp_path: Path) -> None:
    """The outbox keeps a day of published rows, and until a vacuum each row marked published leaves a dead
    version behind: the claim must reach the few unpublished rows without walking those (an index scan of the
    partial index, in id order, no sort), whatever the day's count. On PostgreSQL the relay claims and marks in
    one statement (claim_and_mark_sql): its update finds the claimed rows by their key, not by a scan."""
    engine = databases.shards["s0"].engine
    postgres = engine.dialect.name == "postgresql"
    if postgres:
        async with engine.begin() as conn:  # the dead versions stay: no vacuum comes to clean them up
            await conn.exec_driver_sql("ALTER TABLE outbox SET (autovacuum_enabled = false)")
    log = EmbeddedLog(BusSettings(embedded_path=tmp_path / "log.db", partitions=3))
    await write_outbox(databases, 2000)
    await OutboxRelay(databases, log, outbox, topic="dose-events", batch_size=500, idle_seconds=0.05).drain()
    waiting = await write_outbox(databases, 3)
    if not postgres:  # SQLite: the plan's text
        claim = claim_statement(outbox, 500).compile(engine, compile_kwargs={"literal_binds": True})
        async with engine.connect() as conn:
            plan = " ".join(str(r[-1]) for r in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {claim}"))
        assert "ix_outbox_unpublished" in plan and "TEMP B-TREE" not in plan, plan
        return
    claim = claim_and_mark_sql(outbox, 500)
    with pytest.raises(ZeroDivisionError):
        async with databases.shards["s0"].driver_transaction(CLAIM_BEGIN) as conn:  # as a relay's pass begins
            raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {claim}")
            raise ZeroDivisionError  # a failed publish: the transaction is rolled back, nothing stays marked
    [explained] = json.loads(raw) if isinstance(raw, str) else raw
    nodes = list(_nodes(explained["Plan"]))
    scans = {
        (n["Node Type"], n.get("Index Name"))
        for n in nodes
        if n.get("Relation Name") == "outbox" and n["Node Type"] != "ModifyTable"
    }
    assert scans == {("Index Scan", "ix_outbox_unpublished"), ("Index Scan", "outbox_pkey")}, scans
    assert "Sort" not in {n["Node Type"] for n in nodes}
    assert explained["Plan"]["Shared Hit Blocks"] + explained["Plan"].get("Shared Read Blocks", 0) < 50
    assert explained["Plan"]["Actual Rows"] == len(waiting)
    relay = OutboxRelay(databases, log, outbox, topic="dose-events", batch_size=500, idle_seconds=0.05)
    assert await relay.drain() == len(waiting)


@pytest.mark.postgres
async def test_one_relay_at_a_time_publishes_a_shards_outbox(make_database: Callable[..., str], tmp_path: Path) -> None:
    """Two relays on one shard: while the first holds its claim (publishing), the second claims nothing — it would
    otherwise take the next rows and could publish a municipality's later events before its earlier ones — and it
    takes over once the first commits. Neither waits for the other."""
    shard = make_database("records_s0", TREES / "shard")
    dbs = Databases.connect(shard, {"s0": shard}, pool_size=5)
    try:
        await write_outbox(dbs, 6)
        claim = claim_and_mark_sql(outbox, 3)
        db = dbs.shards["s0"]
        async with db.driver_transaction(CLAIM_BEGIN) as first:
            mine = sorted(r["id"] for r in await first.fetch(claim))
            async with db.driver_transaction(CLAIM_BEGIN) as second:
                started = time.monotonic()
                assert await second.fetch(claim) == []
                assert time.monotonic() - started < 1.0  # skipped, not waited for
            log = EmbeddedLog(BusSettings(embedded_path=tmp_path / "log.db", partitions=3))
            other = OutboxRelay(dbs, log, outbox, topic="dose-events", batch_size=500, idle_seconds=0.05)
            assert await other.publish_pending("s0", db) == 0
        assert len(mine) == 3
        assert await other.drain() == 3  # the rest, once the first relay's pass is over
        published = [e.event_id for e in await read_all(log)]
        assert len(published) == len(set(published)) == 3
    finally:
        await dbs.dispose()


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


@pytest.mark.postgres
async def test_a_publish_mark_writes_a_fraction_of_the_row_to_the_wal(make_database: Callable[..., str]) -> None:
    """The mark is never a HOT update (``published_at`` is in the partial index's predicate): on a full page its
    new version went to another page, and the whole row was written to the WAL again — as much as its insert.
    With room on the page (the shard migration's fill factor) only what changed is logged: measured here, 314
    bytes a row against the insert's 750, and 862 without it."""
    shard = make_database("records_s0", TREES / "shard")
    dbs = Databases.connect(shard, {"s0": shard}, pool_size=2)
    try:
        rows = 400
        async with dbs.shards["s0"].driver_transaction() as conn:
            before = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
        await write_outbox(dbs, rows)
        async with dbs.shards["s0"].driver_transaction() as conn:
            inserted = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::pg_lsn)", before)
            before = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
        async with dbs.shards["s0"].driver_transaction(CLAIM_BEGIN) as conn:
            assert len(await conn.fetch(claim_and_mark_sql(outbox, rows))) == rows
        async with dbs.shards["s0"].driver_transaction() as conn:
            marked = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::pg_lsn)", before)
    finally:
        await dbs.dispose()
    assert marked < inserted / 2, (marked / rows, inserted / rows)
