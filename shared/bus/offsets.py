"""How far a topic's partitions reach — for the consumer-lag metric, never on a consumer's own path.

A consumer keeps its positions in its database; the lag of a partition is its end offset here minus that
position (:func:`report_lag`). Kafka answers a ListOffsets request (which the topic's Describe ACL allows) to
one client kept per cluster; the embedded log with one indexed query per partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from shared.observability import observe_consumer_lag
from shared.settings import BusSettings

log = logging.getLogger(__name__)


async def end_offsets(settings: BusSettings, topic: str) -> dict[int, int]:
    """The next offset each partition of ``topic`` will be written at (0 for an empty partition)."""
    if settings.kind == "kafka":
        return await asyncio.to_thread(_kafka_end_offsets, settings, topic)
    return await asyncio.to_thread(_embedded_end_offsets, Path(settings.embedded_path), topic)


async def report_lag(
    settings: BusSettings, topic: str, consumer: str, positions: Callable[[], Awaitable[dict[int, int]]]
) -> None:
    """Set ``vrs_consumer_lag_events`` for every partition of ``topic``, from the consumer's stored positions."""
    ends = await end_offsets(settings, topic)
    observe_consumer_lag(consumer, topic, positions=await positions(), ends=ends)


async def report_lag_forever(
    settings: BusSettings,
    topic: str,
    consumer: str,
    positions: Callable[[], Awaitable[dict[int, int]]],
    *,
    interval: float = 15.0,
) -> None:
    """For a consumer's worker process (no scrape-time hook there): :func:`report_lag` every ``interval``
    seconds until cancelled. A failed sample is logged and the gauges keep their last values."""
    while True:
        try:
            await report_lag(settings, topic, consumer, positions)
        except Exception as exc:
            log.warning("consumer lag of %s on %s not sampled (%s)", consumer, topic, type(exc).__name__)
        await asyncio.sleep(interval)


def _embedded_end_offsets(path: Path, topic: str) -> dict[int, int]:
    if not path.exists():
        return {}
    conn = sqlite3.connect(path, timeout=5)
    try:
        row = conn.execute("SELECT partitions FROM topics WHERE topic = ?", (topic,)).fetchone()
        ends = {}
        for partition in range(int(row[0]) if row else 0):
            (last,) = conn.execute(
                "SELECT MAX(offset) FROM log WHERE topic = ? AND partition = ?", (topic, partition)
            ).fetchone()
            ends[partition] = 0 if last is None else int(last) + 1
        return ends
    finally:
        conn.close()


# One client per cluster, kept for the process's life: a scrape then costs one ListOffsets request (about 1 ms and
# 0.5 ms of CPU on the bench's machine). A client built per scrape cost 117 ms and 9 ms of CPU on a quiet machine
# and 280-540 ms under load, two per scrape of records, in a worker thread that took the GIL from its event
# loop: scraping every 2 s put 10-15 ms on the open-loop run's p99. A kept client has one I/O thread, idle
# between scrapes, and does not hold its process at exit.
_clients: dict[tuple[str, ...], Any] = {}
# kafka-python's clients are not thread-safe: one call at a time per cluster. A call that finds another still
# under way (Kafka down: each waits up to its 10 s timeout) fails at once instead of queueing behind it, so
# scrapes during an outage never hold more than one of the worker threads the relay also needs.
_in_use: dict[tuple[str, ...], threading.Lock] = {}
# Makes each cluster's lock, and takes every client at close_clients; a cluster's client itself is built and
# dropped under that cluster's lock.
_clients_lock = threading.Lock()


class EndOffsetsBusy(RuntimeError):
    """Another call is asking the same cluster (and waiting for it): this one gives up rather than queue."""


def _client_key(settings: BusSettings) -> tuple[str, ...]:
    from shared.bus.kafka import security_options

    options = security_options(settings)
    return (
        settings.kafka_bootstrap_servers,
        settings.kafka_client_id,
        *(f"{k}={v}" for k, v in sorted(options.items())),
    )


def _kafka_end_offsets(settings: BusSettings, topic: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    from shared.bus.kafka import CONNECT_TIMEOUT, REQUEST_TIMEOUT, security_options

    key = _client_key(settings)
    with _clients_lock:
        in_use = _in_use.setdefault(key, threading.Lock())
    if not in_use.acquire(blocking=False):
        raise EndOffsetsBusy(f"the end offsets of {settings.kafka_bootstrap_servers} are being asked already")
    try:
        consumer = _clients.get(key)
        if consumer is None:
            consumer = _clients[key] = KafkaConsumer(
                **security_options(settings),
                bootstrap_servers=settings.kafka_bootstrap_servers,
                client_id=f"{settings.kafka_client_id}-lag",
                group_id=None,
                enable_auto_commit=False,
                bootstrap_timeout_ms=CONNECT_TIMEOUT * 1000,
                request_timeout_ms=REQUEST_TIMEOUT * 1000,
            )
        try:
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            return {tp.partition: int(offset) for tp, offset in consumer.end_offsets(partitions).items()}
        except Exception:
            _clients.pop(key, None)  # a failed client is not trusted again: the next call starts afresh
            with contextlib.suppress(Exception):
                consumer.close(autocommit=False)
            raise
    finally:
        in_use.release()


def close_clients() -> None:
    """Close the kept clients (at an app's shutdown): their I/O threads stop, and stop retrying a cluster that
    has gone away. A later call builds a client again."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for consumer in clients:
        with contextlib.suppress(Exception):
            consumer.close(autocommit=False)
