"""The consumer counts every event exactly once: redelivery, restarts, crashes mid-batch and garbage on the
topic included. Runs on a real database (SQLite, PostgreSQL) and a real bus (the embedded log, Kafka)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import delete, func, select

from services.stats import repository
from services.stats.consumer import StatsConsumer
from services.stats.models import consumer_offsets, consumer_state, dose_counts, processed_events
from shared.bus import Message, OutgoingMessage, make_publisher
from shared.db import Database
from shared.domain.age import AgeBand, AgeBand10
from shared.events import DoseEvent, DoseEventType, StatsCell
from shared.settings import BusSettings
from tests.factories import cell
from tests.integration.services.stats.conftest import assert_rollups_match

CellKey = tuple[Any, ...]


UNKNOWN = cell(sex="U", age_band=AgeBand.UNKNOWN)  # a dose whose coupon holder is not registered yet


def key(c: StatsCell) -> CellKey:
    return (
        c.date,
        c.prefecture,
        c.municipality,
        c.sex,
        c.age_band.value,
        c.age_band_10.value,
        c.medical_worker,
        c.dose_number,
        c.vaccine,
    )


def event(
    kind: DoseEventType,
    new: StatsCell | None,
    previous: StatsCell | None = None,
    *,
    dose_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
) -> DoseEvent:
    municipality = (new or previous or UNKNOWN).municipality
    return DoseEvent(
        type=kind,
        dose_id=dose_id or uuid.uuid4(),
        municipality=municipality,
        cell=new,
        previous_cell=previous,
        occurred_at=occurred_at or datetime.now(UTC),
    )


async def publish(bus: BusSettings, events: Sequence[DoseEvent | bytes], key_: str = "131016") -> None:
    publisher = make_publisher(bus)
    try:
        await publisher.publish(
            [
                OutgoingMessage(key=key_, value=e)
                if isinstance(e, bytes)
                else OutgoingMessage(key=e.key, value=e.to_bytes())
                for e in events
            ]
        )
    finally:
        await publisher.close()


async def counts(db: Database) -> dict[CellKey, int]:
    """Every non-zero cell."""
    c = dose_counts.c
    stmt = select(*(column for column in dose_counts.primary_key.columns), c.count).where(c.count != 0)
    async with db.sessionmaker() as session:
        return {tuple(row[:-1]): int(row[-1]) for row in (await session.execute(stmt)).all()}


async def stored_positions(db: Database, consumer: str = "stats") -> dict[int, int]:
    async with db.sessionmaker() as session:
        rows = await session.execute(
            select(consumer_offsets.c.partition, consumer_offsets.c.next_offset).where(
                consumer_offsets.c.consumer == consumer
            )
        )
        return {int(p): int(o) for p, o in rows.all()}


async def processed_count(db: Database) -> int:
    async with db.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(processed_events)) or 0)


def consumer_for(db: Database, bus: BusSettings, **kwargs: Any) -> StatsConsumer:
    options: dict[str, Any] = {"max_records": 500, "poll_timeout": 0.2, "retry_initial": 0.01, "retry_max": 0.05}
    options.update(kwargs)
    return StatsConsumer(db, bus=bus, **options)


async def settle(consumer: StatsConsumer, db: Database, published: int, timeout: float = 60) -> None:
    """Step until the committed offsets cover ``published`` messages (works on Kafka, where polls lag)."""
    deadline = time.monotonic() + timeout
    while sum((await stored_positions(db, consumer.name)).values()) < published:
        assert time.monotonic() < deadline, "the consumer did not catch up"
        await consumer.step(timeout=0.5)
    await consumer.drain(idle=0.2)


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# --- counting -----------------------------------------------------------------------------------------


async def test_recorded_events_are_counted_once(stats_db: Database, any_bus: BusSettings) -> None:
    a, b = (
        cell(),
        cell(sex="M", age_band=AgeBand.SIXTY_FIVE_PLUS, dose_number=2, municipality="011002", prefecture="01"),
    )
    events = [event(DoseEventType.RECORDED, a), event(DoseEventType.RECORDED, a), event(DoseEventType.RECORDED, b)]
    applied_before = metric("vrs_stats_events_applied_total", {"type": "dose.recorded"})
    await publish(any_bus, events)

    consumer = consumer_for(stats_db, any_bus)
    try:
        await settle(consumer, stats_db, published=3)
    finally:
        await consumer.stop()

    assert await counts(stats_db) == {key(a): 2, key(b): 1}
    assert await processed_count(stats_db) == 3
    assert sum((await stored_positions(stats_db)).values()) == 3
    assert metric("vrs_stats_events_applied_total", {"type": "dose.recorded"}) - applied_before == 3


async def test_an_event_delivered_twice_is_counted_once(stats_db: Database, any_bus: BusSettings) -> None:
    first = event(DoseEventType.RECORDED, cell())
    duplicates_before = metric("vrs_stats_events_duplicate_total")
    # The relay published it twice in one go, and once more later: three messages, one event.
    await publish(any_bus, [first, first])
    consumer = consumer_for(stats_db, any_bus)
    try:
        await settle(consumer, stats_db, published=2)
        await publish(any_bus, [first])
        await settle(consumer, stats_db, published=3)
    finally:
        await consumer.stop()

    assert await counts(stats_db) == {key(cell()): 1}
    assert await processed_count(stats_db) == 1
    assert metric("vrs_stats_events_duplicate_total") - duplicates_before == 2


async def test_corrections_voids_and_matches_move_counts_exactly(stats_db: Database, bus: BusSettings) -> None:
    dose = uuid.uuid4()
    registered = cell(sex="M", age_band=AgeBand.SIXTY_FIVE_PLUS, age_band_10=AgeBand10.AGE_70_79)
    # A date corrected across the 80th birthday's eve: the 10-year band moves with it.
    corrected = registered.model_copy(
        update={"date": date(2021, 6, 2), "dose_number": 2, "age_band_10": AgeBand10.AGE_80_89}
    )
    other = cell(municipality="011002", prefecture="01")
    consumer = consumer_for(stats_db, bus)

    async def apply(*events: DoseEvent) -> dict[CellKey, int]:
        await publish(bus, events)
        await consumer.drain()
        return await counts(stats_db)

    try:
        # Unmatched: counted as U/UNK until the resident is registered.
        assert await apply(event(DoseEventType.RECORDED, UNKNOWN, dose_id=dose)) == {key(UNKNOWN): 1}
        assert await apply(event(DoseEventType.RECORDED, other)) == {key(UNKNOWN): 1, key(other): 1}
        # Matched: −U/UNK, +the resident's real cell.
        assert await apply(event(DoseEventType.MATCHED, registered, UNKNOWN, dose_id=dose)) == {
            key(registered): 1,
            key(other): 1,
        }
        # Corrected date and dose number: −old cell, +new cell.
        assert await apply(event(DoseEventType.CORRECTED, corrected, registered, dose_id=dose)) == {
            key(corrected): 1,
            key(other): 1,
        }
        # A correction that touches no statistics dimension (a lot number) changes nothing.
        assert await apply(event(DoseEventType.CORRECTED, corrected, corrected, dose_id=dose)) == {
            key(corrected): 1,
            key(other): 1,
        }
        # Voided: −the cell it counted in, nothing added.
        assert await apply(event(DoseEventType.VOIDED, None, corrected, dose_id=dose)) == {key(other): 1}
        await assert_rollups_match(stats_db)
    finally:
        await consumer.stop()


async def test_events_from_before_the_10_year_band_count_as_unknown_and_move_out_of_it(
    stats_db: Database, bus: BusSettings
) -> None:
    """An older records sent cells without ``age_band_10``: they count as UNK, which is what records kept for
    those doses, so the dose's next event (with the band) takes the count out of UNK, exactly once."""
    dose = uuid.uuid4()
    old_cell = cell(sex="M", age_band=AgeBand.SIXTY_FIVE_PLUS)  # age_band_10 UNK
    banded = old_cell.model_copy(update={"age_band_10": AgeBand10.AGE_70_79})
    older = event(DoseEventType.RECORDED, old_cell, dose_id=dose).model_dump(mode="json")
    del older["cell"]["age_band_10"]
    raw = json.dumps(older).encode()
    consumer = consumer_for(stats_db, bus)
    try:
        await publish(bus, [raw, raw])  # redelivered too
        await consumer.drain()
        assert await counts(stats_db) == {key(old_cell): 1}
        moved = event(DoseEventType.CORRECTED, banded, old_cell, dose_id=dose)
        await publish(bus, [moved, moved])
        await consumer.drain()
        assert await counts(stats_db) == {key(banded): 1}
        await assert_rollups_match(stats_db)
        await publish(bus, [event(DoseEventType.VOIDED, None, banded, dose_id=dose)])
        await consumer.drain()
        assert await counts(stats_db) == {}
    finally:
        await consumer.stop()


async def test_one_batch_folds_many_events_into_exact_counts(stats_db: Database, bus: BusSettings) -> None:
    """A batch's net effect equals applying its events one by one, across partitions and batch borders."""
    municipalities = ["011002", "131016", "141003", "271004", "472018"]
    expected: dict[CellKey, int] = {}
    events: list[DoseEvent] = []
    for i in range(240):
        m = municipalities[i % len(municipalities)]
        c = cell(municipality=m, prefecture=m[:2], dose_number=1 + i % 2, date=date(2021, 6, 1) + timedelta(days=i % 3))
        events.append(event(DoseEventType.RECORDED, c))
        expected[key(c)] = expected.get(key(c), 0) + 1
        if i % 4 == 0:  # every fourth dose gets corrected to the next day
            moved = c.model_copy(update={"date": c.date + timedelta(days=1)})
            events.append(event(DoseEventType.CORRECTED, moved, c, dose_id=events[-1].dose_id))
            expected[key(c)] -= 1
            expected[key(moved)] = expected.get(key(moved), 0) + 1
    await publish(bus, events[:100])
    await publish(bus, events[100:])

    consumer = consumer_for(stats_db, bus, max_records=37)
    try:
        assert await consumer.drain() == len(events)
    finally:
        await consumer.stop()
    assert await counts(stats_db) == {k: v for k, v in expected.items() if v}
    assert sum((await stored_positions(stats_db)).values()) == len(events)
    await assert_rollups_match(stats_db)


# --- restarts and crashes -------------------------------------------------------------------------------


async def test_a_restarted_consumer_resumes_at_its_offsets(stats_db: Database, any_bus: BusSettings) -> None:
    early = [event(DoseEventType.RECORDED, cell(dose_number=1)) for _ in range(5)]
    late = [event(DoseEventType.RECORDED, cell(dose_number=2)) for _ in range(4)]
    await publish(any_bus, early)
    first = consumer_for(stats_db, any_bus)
    try:
        await settle(first, stats_db, published=5)
    finally:
        await first.stop()
    positions = await stored_positions(stats_db)

    # While it was down: new events, and a relay that re-published two old ones.
    await publish(any_bus, [*late, early[0], early[3]])
    second = consumer_for(stats_db, any_bus)
    try:
        await settle(second, stats_db, published=11)
    finally:
        await second.stop()

    assert await counts(stats_db) == {key(cell(dose_number=1)): 5, key(cell(dose_number=2)): 4}
    assert await processed_count(stats_db) == 9
    after = await stored_positions(stats_db)
    assert sum(after.values()) == 11
    assert all(after[p] >= o for p, o in positions.items())


async def test_lost_offsets_replay_without_double_counting(stats_db: Database, bus: BusSettings) -> None:
    """Even a consumer that starts again from offset 0 counts nothing twice: event ids are the guard."""
    events = [event(DoseEventType.RECORDED, cell()) for _ in range(6)]
    await publish(bus, events)
    consumer = consumer_for(stats_db, bus)
    try:
        await consumer.drain()
    finally:
        await consumer.stop()
    async with stats_db.sessionmaker() as session, session.begin():
        await session.execute(delete(consumer_offsets))

    replay = consumer_for(stats_db, bus)
    try:
        assert await replay.drain() == 0
    finally:
        await replay.stop()
    assert await counts(stats_db) == {key(cell()): 6}
    assert sum((await stored_positions(stats_db)).values()) == 6


async def test_a_batch_that_fails_midway_is_retried_whole(
    stats_db: Database, bus: BusSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed batch's processed ids and offsets roll back with its counts; the retry applies it once."""
    events = [event(DoseEventType.RECORDED, cell(dose_number=1 + i % 3)) for i in range(30)]
    await publish(bus, events)
    calls = 0
    # A session's batch on SQLite, the asyncpg connection's on PostgreSQL (shared.consumer.DriverHandler).
    for kind in (repository.ConsumerRepository, repository.DriverConsumerRepository):

        async def flaky_add(self: Any, deltas: Any, *, real_add: Any = kind.add_to_counts, **kwargs: Any) -> None:
            nonlocal calls
            calls += 1
            await real_add(self, deltas, **kwargs)  # the counts are written, then the "crash" comes
            if calls in (2, 3):
                raise ConnectionError("database went away")

        monkeypatch.setattr(kind, "add_to_counts", flaky_add)
    errors_before = metric("vrs_stats_consumer_errors_total")
    consumer = consumer_for(stats_db, bus, max_records=7, poll_timeout=0.05)
    consumer.start()
    try:
        deadline = time.monotonic() + 30
        while sum((await stored_positions(stats_db)).values()) < len(events):
            assert time.monotonic() < deadline, "the consumer did not recover"
            await asyncio.sleep(0.02)
    finally:
        await consumer.stop()

    assert not consumer.running
    assert await counts(stats_db) == {key(cell(dose_number=n)): 10 for n in (1, 2, 3)}
    assert await processed_count(stats_db) == 30
    assert metric("vrs_stats_consumer_errors_total") - errors_before == 2


async def test_a_consumer_waits_for_its_database(tmp_path: Any, bus: BusSettings) -> None:
    """Before migrations ran (or while the database is down) it keeps retrying instead of dying."""
    database = Database.connect(f"sqlite+aiosqlite:///{tmp_path / 'not-migrated.db'}")
    await publish(bus, [event(DoseEventType.RECORDED, cell())])
    errors_before = metric("vrs_stats_consumer_errors_total")
    consumer = consumer_for(database, bus)
    consumer.start()
    try:
        deadline = time.monotonic() + 10
        while metric("vrs_stats_consumer_errors_total") - errors_before < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert consumer.running
    finally:
        await consumer.stop()
        await database.engine.dispose()


async def test_undecodable_messages_are_skipped_counted_and_not_logged(
    stats_db: Database, bus: BusSettings, caplog: pytest.LogCaptureFixture
) -> None:
    good = event(DoseEventType.RECORDED, cell())
    secret = "PAYLOAD-123456789018"
    future = good.model_dump(mode="json") | {"schema_version": 99, "event_id": str(uuid.uuid4())}
    garbage = [f"not json {secret}".encode(), f'{{"type": "{secret}"}}'.encode(), str(future).encode(), b"\xff\xfe"]
    before = metric("vrs_stats_events_undecodable_total")
    await publish(bus, [garbage[0], garbage[1]])
    await publish(bus, [good, garbage[2], garbage[3]])

    consumer = consumer_for(stats_db, bus)
    with caplog.at_level(logging.WARNING, logger="services.stats"):
        try:
            assert await consumer.drain() == 1
        finally:
            await consumer.stop()

    assert await counts(stats_db) == {key(cell()): 1}
    assert sum((await stored_positions(stats_db)).values()) == 5  # past the garbage: it will not block again
    assert metric("vrs_stats_events_undecodable_total") - before == 4
    assert "undecodable" in caplog.text
    assert secret not in caplog.text
    assert "123456789018" not in caplog.text


def aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def test_state_records_when_counts_last_changed(stats_db: Database, bus: BusSettings) -> None:
    occurred = datetime(2021, 6, 1, 9, 30, tzinfo=UTC)
    recorded = event(DoseEventType.RECORDED, cell(), occurred_at=occurred)

    async def state() -> Any:
        async with stats_db.sessionmaker() as session:
            return (await session.execute(select(consumer_state))).one()

    await publish(bus, [recorded])
    consumer = consumer_for(stats_db, bus)
    started = datetime.now(UTC)
    try:
        await consumer.drain()
        first = await state()
        await publish(bus, [recorded])
        await consumer.drain()
        second = await state()
    finally:
        await consumer.stop()
    assert first.consumer == "stats"
    assert aware(first.last_event_at) == occurred
    assert aware(first.updated_at) >= started - timedelta(seconds=1)
    # A duplicate changes no count, so the time the counts last changed stays.
    assert second.updated_at == first.updated_at
    assert await counts(stats_db) == {key(cell()): 1}


async def test_an_event_that_moves_no_count_still_advances_the_state(stats_db: Database, bus: BusSettings) -> None:
    """A correction inside one cell (a lot number, say) writes no count, but the statistics are now as of it."""
    recorded = event(DoseEventType.RECORDED, cell(), occurred_at=datetime(2021, 6, 1, 9, 30, tzinfo=UTC))
    later = datetime(2021, 6, 2, 10, 0, tzinfo=UTC)
    corrected = event(DoseEventType.CORRECTED, cell(), cell(), dose_id=recorded.dose_id, occurred_at=later)
    consumer = consumer_for(stats_db, bus)
    try:
        await publish(bus, [recorded])
        await consumer.drain()
        await publish(bus, [corrected])
        await consumer.drain()
    finally:
        await consumer.stop()
    async with stats_db.sessionmaker() as session:
        state = (await session.execute(select(consumer_state))).one()
    assert aware(state.last_event_at) == later
    assert await counts(stats_db) == {key(cell()): 1}


class BatchSizes(StatsConsumer):
    """The stats consumer, noting how many messages each batch it applied held."""

    batches: list[int]

    async def _apply(self, database: Any, messages: Sequence[Message]) -> int:
        self.batches.append(len(messages))
        return await super()._apply(database, messages)


async def test_below_full_speed_a_batch_gathers_what_arrives_while_the_consumer_lingers(
    stats_db: Database, bus: BusSettings
) -> None:
    """``linger``: after a batch smaller than a full poll the consumer waits before it polls again, so a
    trickle of events is applied a few at a time, not one transaction (and one fetch) per event; after an idle
    spell the first event is applied without waiting."""
    # The linger is long beside the trickle below (three publishes 0.05 s apart), so that a slow machine's
    # publishes still fall within it; without one, each of the three is a batch of its own.
    consumer = BatchSizes(stats_db, bus=bus, poll_timeout=0.05, retry_initial=0.01, linger=2.0)
    consumer.batches = []
    consumer.start()
    try:
        await asyncio.sleep(0.3)  # idle: polls that bring nothing
        await publish(bus, [event(DoseEventType.RECORDED, cell())])
        published = time.monotonic()
        while sum(consumer.batches) < 1:
            assert time.monotonic() - published < 1.0, "the first event after idle waited"  # no linger
            await asyncio.sleep(0.01)
        for _ in range(3):  # a trickle, all within the linger after that batch
            await publish(bus, [event(DoseEventType.RECORDED, cell())])
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 10
        while await counts(stats_db) != {key(cell()): 4}:
            assert time.monotonic() < deadline, consumer.batches
            await asyncio.sleep(0.02)
    finally:
        await consumer.stop()
    assert consumer.batches == [1, 3]
