"""records' coupon consumer after a backlog, on real PostgreSQL and the embedded log: the doses its
coupon events move are locked until the transaction commits, and a municipality correcting one of them waits
that long. A batch takes only as many messages as keep those doses within ``coupon_batch_max_doses``; the
rest goes to the next transactions, before anything new is read — every dose moved once, a restart between
two of them included."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from services.records import consumer as records_consumer
from services.records.consumer import coupon_consumers
from services.records.models import CouponProjection, Dose
from services.records.service import MAX_EVENTS, Submission
from services.records.settings import RecordsSettings
from shared.bus import OutgoingMessage, make_publisher
from shared.consumer import IdempotentConsumer
from shared.db import Databases
from shared.domain.sex import Sex
from shared.events import CouponEvent, CouponEventType, CouponState, DoseEventType, coupon_events_from_bytes
from shared.settings import BusSettings
from tests.integration.services.records.records_support import CHIYODA, dose, events_in

pytestmark = pytest.mark.usefixtures("pg_server")
Record = Callable[..., Any]
COUPONS = [f"{n:010d}" for n in range(1, 7)]
DOSES_EACH = 30


@pytest.fixture
async def backlog(record: Record, databases: Databases, tmp_path: Path) -> BusSettings:
    """Six coupons with thirty unmatched doses each, and their holders' events waiting on the bus, one message
    each (as registry's relay publishes single changes)."""
    for number in COUPONS:
        await record(
            *(
                Submission(
                    key=f"{number}-{n}",
                    dose=dose(number, dose_number=1 + n % 10, vaccinated_on=date(2021, 5, 1) + timedelta(days=n)),
                )
                for n in range(DOSES_EACH)
            )
        )
    bus = BusSettings(kind="embedded", embedded_path=tmp_path / "events.db", partitions=1)
    publisher = make_publisher(bus, topic=bus.coupon_topic)
    try:
        for number in COUPONS:
            event = CouponEvent(
                type=CouponEventType.ISSUED,
                municipality=CHIYODA,
                coupon_number=number,
                version=1,
                state=CouponState(resident_id=f"R{number}", sex=Sex("F"), birth_date=date(1950, 4, 2)),
            )
            await publisher.publish([OutgoingMessage(key=event.key, value=event.to_bytes())])
    finally:
        await publisher.close()
    return bus


def consumer_of_chiyoda(
    bus: BusSettings, databases: Databases, max_doses: int, *, max_seconds: float = 60.0, poll: int = 500
) -> IdempotentConsumer:
    settings = RecordsSettings(
        bus=bus, coupon_batch_max_doses=max_doses, coupon_batch_max_seconds=max_seconds, poll_max_records=poll
    )
    [s0, _s1] = coupon_consumers(settings, databases)
    return s0


async def matched(databases: Databases) -> int:
    async with databases.shards["s0"].sessionmaker() as session:
        return int(await session.scalar(select(func.count()).where(Dose.resident_id.is_not(None))) or 0)


async def steps(consumer: IdempotentConsumer, databases: Databases, *, most: int) -> list[int]:
    """The doses matched after each step, up to ``most`` steps or until a poll brings nothing."""
    after: list[int] = []
    while len(after) < most and await consumer.step(timeout=0.5) is not None:
        after.append(await matched(databases))
    return after


async def assert_each_dose_moved_once(databases: Databases) -> None:
    async with databases.shards["s0"].sessionmaker() as session:
        doses = (await session.execute(select(Dose))).scalars().all()
    assert len(doses) == len(COUPONS) * DOSES_EACH
    assert {(d.resident_id is not None, d.version) for d in doses} == {(True, 2)}
    moves = [e.dose_id for e in await events_in(databases, "s0") if e.type is DoseEventType.MATCHED]
    assert sorted(str(m) for m in moves) == sorted(d.dose_id for d in doses)


@pytest.mark.parametrize(
    ("max_doses", "after_each"),
    [
        (60, [60, 120, 180]),  # two coupons a transaction: exactly the bound
        (59, [30, 60, 90, 120, 150, 180]),  # one below it: one coupon each
        (20, [30, 60, 90, 120, 150, 180]),  # a message over the bound alone is taken whole, never stuck
        (10_000, [180]),  # everything one poll brought
    ],
)
async def test_a_backlog_is_applied_in_transactions_that_lock_at_most_the_bound(
    backlog: BusSettings, databases: Databases, max_doses: int, after_each: list[int]
) -> None:
    consumer = consumer_of_chiyoda(backlog, databases, max_doses)
    try:
        assert await steps(consumer, databases, most=10) == after_each
    finally:
        await consumer.stop()
    await assert_each_dose_moved_once(databases)


@pytest.mark.parametrize(
    ("max_seconds", "after_each"),
    [
        (60.0, [60, 120, 180]),  # two messages a poll, each poll's whole within the budget
        (1e-9, [60, 90, 120, 150, 180]),  # once the first transaction is measured: one message a transaction
    ],
)
async def test_the_bound_follows_the_time_the_last_transactions_took_a_dose(
    backlog: BusSettings,
    databases: Databases,
    monkeypatch: pytest.MonkeyPatch,
    max_seconds: float,
    after_each: list[int],
) -> None:
    """The same number of doses locks them twice as long on a host twice as slow: the bound is also the doses
    the last transactions moved in ``coupon_batch_max_seconds``. Nothing is measured before the first
    transaction, which takes up to a quarter of ``coupon_batch_max_doses``."""
    monkeypatch.setattr(records_consumer, "MIN_BATCH_DOSES", 1)  # this backlog is small
    consumer = consumer_of_chiyoda(backlog, databases, 10_000, max_seconds=max_seconds, poll=2)
    try:
        assert await steps(consumer, databases, most=10) == after_each
    finally:
        await consumer.stop()
    await assert_each_dose_moved_once(databases)


async def test_a_restart_with_part_of_a_batch_unapplied_neither_loses_nor_repeats_a_move(
    backlog: BusSettings, databases: Databases
) -> None:
    first = consumer_of_chiyoda(backlog, databases, 60)
    assert await steps(first, databases, most=1) == [60]  # one poll read all six; two applied, four held
    await first.stop()  # the process ends: what it held in memory is gone, the offsets of what it applied stay
    second = consumer_of_chiyoda(backlog, databases, 60)
    try:
        assert await steps(second, databases, most=10) == [120, 180]
    finally:
        await second.stop()
    await assert_each_dose_moved_once(databases)


async def test_a_bulk_imports_backlog_is_applied_a_few_thousand_coupons_a_transaction(
    databases: Databases, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk import announces its coupons a thousand to a message, and one poll brings hundreds of messages: a
    transaction takes at most MAX_EVENTS of them (each coupon it changes holds a lock to its end), and each
    message is decoded about once — not again at every step while it waits (that made the catch-up twice as
    slow)."""
    assert MAX_EVENTS == 5000
    bus = BusSettings(kind="embedded", embedded_path=tmp_path / "events.db", partitions=1)
    publisher = make_publisher(bus, topic=bus.coupon_topic)
    try:
        for m in range(12):
            events = [
                CouponEvent(
                    type=CouponEventType.ISSUED,
                    municipality=CHIYODA,
                    coupon_number=f"{m * 1000 + n:010d}",
                    version=1,
                    state=CouponState(resident_id=f"R{m}-{n}", sex=Sex("M"), birth_date=date(1980, 1, 1)),
                ).model_dump_json()
                for n in range(1000)
            ]
            await publisher.publish([OutgoingMessage(key=CHIYODA, value=f"[{','.join(events)}]".encode())])
    finally:
        await publisher.close()
    decoded: list[int] = []

    def counting(raw: bytes) -> list[CouponEvent]:
        decoded.append(1)
        return coupon_events_from_bytes(raw)

    monkeypatch.setattr(records_consumer, "coupon_events_from_bytes", counting)
    consumer = consumer_of_chiyoda(bus, databases, 2000)
    known: list[int] = []
    try:
        while await consumer.step(timeout=0.5) is not None:
            async with databases.shards["s0"].sessionmaker() as session:
                known.append(int(await session.scalar(select(func.count()).select_from(CouponProjection)) or 0))
    finally:
        await consumer.stop()
    assert known == [5000, 10000, 12000]
    assert len(decoded) <= 12 + len(known)  # each message once, and the one that did not fit each step again


async def test_each_transaction_shows_on_metrics_with_the_doses_it_moved_and_the_next_bound(
    backlog: BusSettings, databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an operator reads when dose writes wait on coupon locks: how long each transaction's apply took, how
    many doses coupon events moved, and the bound the next transaction has."""
    monkeypatch.setattr(records_consumer, "MIN_BATCH_DOSES", 1)

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"shard": "s0"}) or 0.0

    before = {
        name: sample(name)
        for name in ("vrs_records_coupon_apply_seconds_count", "vrs_records_coupon_doses_moved_total")
    }
    consumer = consumer_of_chiyoda(backlog, databases, 10_000, max_seconds=1e-9, poll=2)
    assert sample("vrs_records_coupon_batch_bound_doses") == 2500  # nothing measured: a quarter of the count
    try:
        after_each = await steps(consumer, databases, most=10)
    finally:
        await consumer.stop()
    assert after_each == [60, 90, 120, 150, 180]
    assert sample("vrs_records_coupon_apply_seconds_count") - before["vrs_records_coupon_apply_seconds_count"] == 5
    assert sample("vrs_records_coupon_doses_moved_total") - before["vrs_records_coupon_doses_moved_total"] == 180
    assert sample("vrs_records_coupon_batch_bound_doses") == 1  # measured: the floor, with a budget of a nanosecond
