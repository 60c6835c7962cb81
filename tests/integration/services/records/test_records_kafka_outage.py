"""Kafka down for over 30 s while doses keep coming, on real PostgreSQL and the harness's real broker: doses
are accepted as fast as before, the backlog shows on the relay's gauges, and when the broker returns the outbox
drains with every event on the topic, none counted twice, in order per municipality; the relay's failed publishes
leave no Kafka client running behind them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import pytest
from sqlalchemy import select

import shared.bus.kafka as kafka_bus
from devtools.harness.kafka import KafkaServer
from services.records.models import outbox
from services.records.service import Submission
from shared.bus import Message, make_publisher, make_source
from shared.db import Databases
from shared.events import dose_events_from_bytes
from shared.observability import OUTBOX_BACKLOG, OUTBOX_OLDEST_AGE
from shared.outbox import OutboxRelay, sample_backlog
from shared.settings import BusSettings
from tests.integration.services.records.records_support import CHIYODA, SAPPORO, dose

pytestmark = pytest.mark.usefixtures("pg_server")
Record = Callable[..., Any]
OUTAGE_SECONDS = 32
BATCH = 20


def producer_threads() -> int:
    """Live network threads of this process's Kafka publishers (kafka-python names them after the client id)."""
    return sum(t.name.endswith("-publisher-network-thread") for t in threading.enumerate())


async def most_producer_threads(stop: asyncio.Event) -> int:
    most = 0
    while not stop.is_set():
        most = max(most, producer_threads())
        await asyncio.sleep(0.05)
    return most


def gauge(metric: Any, shard: str) -> float:
    return float(metric.labels("records", shard)._value.get())


class Load:
    """Batches of doses, one after the other, each timed; which phase it fell in is recorded."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.phase = "before"
        self.accepted: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.serial = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            subs = []
            for _ in range(BATCH):
                self.serial += 1
                n = self.serial
                municipality = CHIYODA if n % 2 else SAPPORO
                day = date(2021, 3, 1) + timedelta(days=n % 200)
                subs.append(
                    Submission(key=f"o-{n}", dose=dose(f"{n:010d}", municipality=municipality, vaccinated_on=day))
                )
            phase, started = self.phase, time.monotonic()
            outcomes = await self.record(*subs)
            elapsed = time.monotonic() - started
            assert all(o.accepted is not None for o in outcomes), [o.error for o in outcomes if o.error]
            self.accepted[phase] += len(outcomes)
            self.seconds[phase] += elapsed
            self.latencies[phase].append(elapsed)

    def rate(self, phase: str) -> float:
        return self.accepted[phase] / max(self.seconds[phase], 1e-9)


async def read_topic(settings: BusSettings, expected: int, timeout: float = 60) -> list[Message]:
    source = make_source(settings, consumer="outage-check")
    try:
        await source.assign(dict.fromkeys(await source.partitions(), 0))
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            out.extend(await source.poll(max_records=2000, timeout=0.5))
        out.extend(await source.poll(max_records=2000, timeout=1.0))  # and nothing beyond
        return out
    finally:
        await source.close()


async def test_a_kafka_outage_delays_dose_events_and_loses_none(
    record: Record, databases: Databases, kafka_server: KafkaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short client timeouts: the relay notices the outage and the broker's return within seconds.
    monkeypatch.setattr(kafka_bus, "CONNECT_TIMEOUT", 2)
    monkeypatch.setattr(kafka_bus, "REQUEST_TIMEOUT", 2)
    monkeypatch.setattr(kafka_bus, "DELIVERY_TIMEOUT", 5)
    topic = f"dose-outage-{uuid.uuid4().hex[:8]}"
    kafka_server.create_topic(topic, 4)
    settings = BusSettings(
        kind="kafka", topic=topic, partitions=4, kafka_bootstrap_servers=kafka_server.bootstrap_servers
    )
    threads_before = producer_threads()
    publisher = make_publisher(settings, topic=topic)
    relay = OutboxRelay(databases, publisher, outbox, topic=topic, batch_size=200, idle_seconds=0.5)
    relay_task = asyncio.create_task(relay.run())
    load, stop = Load(record), asyncio.Event()
    load_task = asyncio.create_task(load.run(stop))
    threads_task = asyncio.create_task(most_producer_threads(stop))
    try:
        await asyncio.sleep(4)
        load.phase = "outage"
        await asyncio.to_thread(kafka_server.stop)
        await asyncio.sleep(OUTAGE_SECONDS)
        # The backlog is visible while the broker is away: what records' /metrics samples at scrape time.
        await sample_backlog("records", databases, outbox)
        backlog = sum(gauge(OUTBOX_BACKLOG, s) for s in ("s0", "s1"))
        oldest = max(gauge(OUTBOX_OLDEST_AGE, s) for s in ("s0", "s1"))
        load.phase = "after"
        await asyncio.to_thread(kafka_server.start)
        await asyncio.sleep(3)
    finally:
        stop.set()
        await load_task
        most_threads = await threads_task
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            await sample_backlog("records", databases, outbox)
            if sum(gauge(OUTBOX_BACKLOG, s) for s in ("s0", "s1")) == 0:
                break
            await asyncio.sleep(0.5)
    finally:
        relay_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay_task
        await publisher.close()

    # The gauge counts outbox rows (bus messages): each batch wrote one per municipality, its events together.
    assert load.accepted["outage"] > 0 and backlog >= load.accepted["outage"] / BATCH * 0.5
    assert oldest >= OUTAGE_SECONDS - 5
    # Doses kept being accepted at the rate they were before the outage (loose: the machine is shared).
    assert load.rate("outage") >= 0.5 * load.rate("before"), dict(load.accepted)
    assert sum(gauge(OUTBOX_BACKLOG, s) for s in ("s0", "s1")) == 0, "the outbox did not drain"
    # Each publish that failed in the outage stopped its producer before the next one started: one Kafka client
    # at a time, and none once the relay is closed (a client left behind retried the broker for good).
    assert most_threads - threads_before <= 1
    assert producer_threads() == threads_before

    written: list[tuple[str, str]] = []  # (key, event id), in outbox order per shard
    rows = 0  # a batch's events of one municipality share a row (one message)
    for shard in ("s0", "s1"):
        async with databases.shards[shard].sessionmaker() as session:
            for r in await session.execute(select(outbox).order_by(outbox.c.id)):
                rows += 1
                written += [(r.key, str(e.event_id)) for e in dose_events_from_bytes(r.payload)]
    total = sum(load.accepted.values())
    assert len(written) == total
    messages = await read_topic(settings, rows)
    seen: dict[str, bytes] = {}
    first_order: dict[str, list[str]] = defaultdict(list)
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        for event in dose_events_from_bytes(m.value):
            event_id = str(event.event_id)
            if event_id in seen:
                assert seen[event_id] == m.value  # a redelivery (at-least-once), never another event
                continue
            seen[event_id] = m.value
            first_order[m.key].append(event_id)
    # Nothing lost, nothing extra: exactly the outbox's events, each counted once by an idempotent consumer.
    assert set(seen) == {event_id for _, event_id in written}
    # Order per municipality (the partition key) is the order the doses were committed in.
    expected_order: dict[str, list[str]] = defaultdict(list)
    for key, event_id in written:
        expected_order[key].append(event_id)
    assert first_order == expected_order
