"""End offsets and consumer lag, on the embedded log and on a real Kafka broker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from shared.bus import OutgoingMessage
from shared.bus.embedded import EmbeddedLog
from shared.bus.kafka import KafkaPublisher
from shared.bus.offsets import end_offsets, report_lag, report_lag_forever
from shared.settings import BusSettings

KEYS = ["131016", "011002", "271004", "401307", "472018", "131016", "131016"]


async def _publish_and_count(settings: BusSettings, publisher: Any) -> None:
    try:
        await publisher.publish([OutgoingMessage(key=k, value=b"{}") for k in KEYS])
    finally:
        await publisher.close()
    ends = await end_offsets(settings, settings.topic)
    assert sorted(ends) == [0, 1, 2]
    assert sum(ends.values()) == len(KEYS)
    # Every message of one key lands in one partition: 3 of 131016 make that partition reach 3 at least.
    assert max(ends.values()) >= Counter(KEYS)["131016"]

    async def positions() -> dict[int, int]:
        return {p: 1 for p in ends if ends[p]}  # one message of each non-empty partition applied

    consumer = f"test-{uuid.uuid4().hex[:8]}"
    await report_lag(settings, settings.topic, consumer, positions)
    lags = {
        p: REGISTRY.get_sample_value(
            "vrs_consumer_lag_events", {"consumer": consumer, "topic": settings.topic, "partition": str(p)}
        )
        for p in ends
    }
    assert lags == {p: max(0, e - 1) for p, e in ends.items()}


async def test_embedded(tmp_path: Path) -> None:
    settings = BusSettings(embedded_path=tmp_path / "log.db", topic="t", partitions=3)
    assert await end_offsets(settings, "t") == {}  # no log yet
    await _publish_and_count(settings, EmbeddedLog(settings))


async def test_kafka(kafka_server: Any) -> None:
    topic = f"offsets-{uuid.uuid4().hex[:8]}"
    kafka_server.create_topic(topic, 3)
    settings = BusSettings(
        kind="kafka", topic=topic, partitions=3, kafka_bootstrap_servers=kafka_server.bootstrap_servers
    )
    await _publish_and_count(settings, KafkaPublisher(settings))


async def test_a_worker_reports_lag_until_cancelled(tmp_path: Path) -> None:
    settings = BusSettings(embedded_path=tmp_path / "log.db", topic="w", partitions=2)
    log = EmbeddedLog(settings)
    await log.publish([OutgoingMessage(key=k, value=b"{}") for k in KEYS])
    await log.close()
    sampled = asyncio.Event()

    async def positions() -> dict[int, int]:
        sampled.set()
        return {}

    task = asyncio.create_task(report_lag_forever(settings, "w", "worker", positions, interval=0.01))
    await asyncio.wait_for(sampled.wait(), timeout=5)
    await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    total = sum(
        REGISTRY.get_sample_value("vrs_consumer_lag_events", {"consumer": "worker", "topic": "w", "partition": p}) or 0
        for p in ("0", "1")
    )
    assert total == len(KEYS)


async def test_kafka_answers_from_one_kept_client_that_sees_new_messages_and_new_topics(kafka_server: Any) -> None:
    """A scrape asks a client kept per cluster (building one per scrape cost ~0.1-0.5 s of a thread that holds
    the GIL): what it answers must still be the broker's now, for topics created after it was built too."""
    from shared.bus import offsets

    first, later = f"kept-{uuid.uuid4().hex[:8]}", f"kept-{uuid.uuid4().hex[:8]}"
    kafka_server.create_topic(first, 2)
    settings = BusSettings(
        kind="kafka", topic=first, partitions=2, kafka_bootstrap_servers=kafka_server.bootstrap_servers
    )
    assert await end_offsets(settings, first) == {0: 0, 1: 0}
    kept = dict(offsets._clients)
    assert kept

    publisher = KafkaPublisher(settings)
    try:
        await publisher.publish([OutgoingMessage(key=k, value=b"{}") for k in KEYS])
    finally:
        await publisher.close()
    assert sum((await end_offsets(settings, first)).values()) == len(KEYS)

    kafka_server.create_topic(later, 3)
    assert await end_offsets(settings, later) == {0: 0, 1: 0, 2: 0}
    assert offsets._clients == kept  # the same client answered all three

    offsets.close_clients()  # as records' shutdown does: the client stops retrying a cluster that went away
    assert not offsets._clients
    assert all(client._closed for client in kept.values())
    assert sum((await end_offsets(settings, first)).values()) == len(KEYS)  # a client built again
    offsets.close_clients()


async def test_a_call_while_another_asks_the_same_cluster_gives_up_at_once(kafka_server: Any) -> None:
    """With Kafka down each call waits up to its timeout; a scrape arriving meanwhile must not queue a worker
    thread behind it (the relay publishes from the same pool), but fail at once, the gauges keeping their values."""
    from shared.bus import offsets

    topic = f"busy-{uuid.uuid4().hex[:8]}"
    kafka_server.create_topic(topic, 1)
    settings = BusSettings(
        kind="kafka", topic=topic, partitions=1, kafka_bootstrap_servers=kafka_server.bootstrap_servers
    )
    assert await end_offsets(settings, topic) == {0: 0}
    in_use = offsets._in_use[offsets._client_key(settings)]
    in_use.acquire()  # as a call stuck waiting for a broker that went away
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(offsets.EndOffsetsBusy):
            await end_offsets(settings, topic)
        assert asyncio.get_running_loop().time() - started < 1.0
    finally:
        in_use.release()
    assert await end_offsets(settings, topic) == {0: 0}
    offsets.close_clients()
