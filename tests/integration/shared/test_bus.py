"""Both event buses keep the same contract: keyed messages come back in offset order per partition, a
consumer resumes exactly where it says, and delivery is at-least-once (a message published twice is
delivered twice; deduplication is the consumer's job)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

import shared.bus.kafka as kafka_bus
from devtools.harness import free_port
from shared.bus import Message, OutgoingMessage, Source, make_publisher, make_source
from shared.settings import BusSettings

MUNICIPALITIES = ["011002", "131016", "131041", "141003", "232033", "271004", "401307", "472018"]


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> BusSettings:
    """A fresh topic on the embedded log or on the session's Kafka broker."""
    topic = f"test-{uuid.uuid4().hex[:12]}"
    if request.param == "kafka":
        kafka = request.getfixturevalue("kafka_server")
        return BusSettings(kind="kafka", topic=topic, partitions=4, kafka_bootstrap_servers=kafka.bootstrap_servers)
    return BusSettings(kind="embedded", topic=topic, partitions=4, embedded_path=tmp_path / "events.db")


def keyed(count: int, tag: str = "m") -> list[OutgoingMessage]:
    return [
        OutgoingMessage(key=MUNICIPALITIES[i % len(MUNICIPALITIES)], value=f"{tag}-{i}".encode()) for i in range(count)
    ]


async def publish(settings: BusSettings, messages: list[OutgoingMessage]) -> None:
    publisher = make_publisher(settings)
    try:
        await publisher.publish(messages)
    finally:
        await publisher.close()


async def read(source: Source, count: int, timeout: float = 30) -> list[Message]:
    """Poll until ``count`` messages have arrived, then make sure no more follow."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        out.extend(await source.poll(max_records=50, timeout=0.5))
    out.extend(await source.poll(max_records=50, timeout=0.5))
    return out


def by_partition(messages: list[Message]) -> dict[int, list[Message]]:
    grouped: dict[int, list[Message]] = defaultdict(list)
    for m in messages:
        grouped[m.partition].append(m)
    return grouped


async def test_messages_come_back_in_offset_order_per_partition(settings: BusSettings) -> None:
    sent = keyed(120)
    source = make_source(settings, consumer="test")
    try:
        partitions = await source.partitions()
        assert partitions == [0, 1, 2, 3]
        await publish(settings, sent[:70])
        await publish(settings, sent[70:])
        await source.assign({p: 0 for p in partitions})
        received = await read(source, len(sent))
    finally:
        await source.close()

    assert sorted(m.value for m in received) == sorted(m.value for m in sent)
    for partition, messages in by_partition(received).items():
        assert partition in partitions
        assert [m.offset for m in messages] == list(range(len(messages)))  # dense, in order, from 0
    partition_of_key: dict[str, set[int]] = defaultdict(set)
    for m in received:
        partition_of_key[m.key].add(m.partition)
    assert all(len(ps) == 1 for ps in partition_of_key.values())  # a key always lands in one partition
    for key in MUNICIPALITIES:  # so the order per key is the order published
        assert [m.value for m in received if m.key == key] == [m.value for m in sent if m.key == key]


async def test_assign_resumes_exactly_at_the_given_positions(settings: BusSettings) -> None:
    await publish(settings, keyed(80))
    first = make_source(settings, consumer="test")
    try:
        partitions = await first.partitions()
        await first.assign({p: 0 for p in partitions})
        everything = by_partition(await read(first, 80))
    finally:
        await first.close()

    # A consumer restarted with the positions it stored: the next offset to process, per partition.
    positions = {p: len(everything[p]) // 2 for p in partitions}
    second = make_source(settings, consumer="test")
    try:
        await second.assign(positions)
        expected = [m for p in partitions for m in everything[p][positions[p] :]]
        resumed = await read(second, len(expected))
        assert sorted((m.partition, m.offset) for m in resumed) == [(m.partition, m.offset) for m in expected]
        assert {(m.partition, m.offset): m.value for m in resumed} == {
            (m.partition, m.offset): m.value for m in expected
        }

        # It keeps following the topic from there.
        await publish(settings, keyed(8, tag="later"))
        later = await read(second, 8)
        assert sorted(m.value for m in later) == sorted(m.value for m in keyed(8, tag="later"))
        for p, messages in by_partition(later).items():
            assert [m.offset for m in messages] == list(range(len(everything[p]), len(everything[p]) + len(messages)))
    finally:
        await second.close()


async def test_a_message_published_twice_is_delivered_twice(settings: BusSettings) -> None:
    message = OutgoingMessage(key="131016", value=b'{"event_id": "e-1"}')
    await publish(settings, [message])
    await publish(settings, [message])  # e.g. the relay crashed before marking the outbox row sent
    source = make_source(settings, consumer="test")
    try:
        await source.assign({p: 0 for p in await source.partitions()})
        received = await read(source, 2)
    finally:
        await source.close()
    assert [(m.key, m.value) for m in received] == [(message.key, message.value)] * 2
    assert received[0].partition == received[1].partition
    assert [m.offset for m in received] == [0, 1]


async def test_poll_returns_empty_after_the_timeout(settings: BusSettings) -> None:
    source = make_source(settings, consumer="test")
    try:
        await source.assign({p: 0 for p in await source.partitions()})
        started = time.monotonic()
        assert await source.poll(max_records=10, timeout=0.3) == []
        assert time.monotonic() - started < 5
    finally:
        await source.close()


async def test_kafka_publisher_survives_a_broker_that_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating the publisher never touches the network; publishing to a dead broker raises (so the outbox
    keeps its rows) instead of hanging or crashing the service, and the next publish tries again."""
    monkeypatch.setattr(kafka_bus, "CONNECT_TIMEOUT", 1)
    settings = BusSettings(kind="kafka", topic="down", kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    publisher = make_publisher(settings)
    try:
        for _ in range(2):
            with pytest.raises(Exception, match=r"(?i)timeout|timed out|bootstrap"):
                await publisher.publish(keyed(1))
    finally:
        await publisher.close()


@pytest.mark.kafka
async def test_a_trickle_of_messages_reaches_a_kafka_consumer_in_fuller_batches_than_one_a_fetch(
    kafka_server: object,
) -> None:
    """With ``kafka_fetch_min_bytes`` above what a trickle brings, the broker holds a consumer's fetch for
    ``kafka_fetch_max_wait_ms``, so the trickle comes in fuller batches — against about one message a batch
    with Kafka's defaults (a fetch answered at the first message). The settings reach the consumer."""

    async def batches(**fetch: int) -> list[int]:
        settings = BusSettings(
            kind="kafka",
            topic=f"test-{uuid.uuid4().hex[:12]}",
            partitions=1,
            kafka_bootstrap_servers=kafka_server.bootstrap_servers,  # type: ignore[attr-defined]
        ).model_copy(update=fetch)
        await publish(settings, keyed(1, "first"))  # the topic exists, the connections are up
        publisher, source = make_publisher(settings), make_source(settings, consumer="test")
        sizes: list[int] = []
        try:
            await source.assign({p: 1 for p in await source.partitions()})

            async def trickle() -> None:
                for message in keyed(40):
                    await publisher.publish([message])
                    await asyncio.sleep(0.01)

            sending = asyncio.create_task(trickle())
            while sum(sizes) < 40:
                got = await source.poll(max_records=500, timeout=2)
                assert got or not sending.done(), "messages missing"
                if got:
                    sizes.append(len(got))
            await sending
        finally:
            await publisher.close()
            await source.close()
        return sizes

    eager = await batches()  # Kafka's defaults: a fetch is answered at the first message
    held = await batches(kafka_fetch_min_bytes=64 * 1024, kafka_fetch_max_wait_ms=100)
    assert sum(eager) == sum(held) == 40
    assert len(held) * 2 <= len(eager), (held, eager)
