"""The event bus on Apache Kafka, through kafka-python.

kafka-python is blocking, so every call runs in a worker thread (:func:`asyncio.to_thread`) and the event
loop never waits on the network. Clients are created lazily: a broker that is down when a service starts
does not stop the service, the next call simply tries again.

- :class:`KafkaPublisher`: an idempotent producer (``acks=all``); :meth:`~KafkaPublisher.publish` returns
  only once the broker has acknowledged every message, and raises otherwise so the caller keeps them.
- :class:`KafkaSource`: a consumer with manual partition assignment, or after :meth:`~KafkaSource.join`
  a member of a consumer group. Either way the consumer keeps its offsets in its own database and hands
  them to :meth:`~KafkaSource.assign`; in a group, partitions given by a rebalance are paused until then,
  and what is committed to Kafka (:meth:`~KafkaSource.commit`) only shows the group's lag to operators.
  A stored offset that the topic no longer has is an error, never a silent skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError, for_code

from shared.bus import Assignment, Message, OutgoingMessage
from shared.settings import BusSettings

log = logging.getLogger(__name__)

# Seconds. A publish to an unreachable broker fails after DELIVERY_TIMEOUT instead of hanging the relay.
CONNECT_TIMEOUT = 10
REQUEST_TIMEOUT = 10
DELIVERY_TIMEOUT = 30
# The producer sends when a publish flushes (see KafkaPublisher), not before; a record batch of up to
# BATCH_BYTES per partition (below the broker's default 1 MiB message.max.bytes).
LINGER_UNTIL_FLUSH_MS = 1000
BATCH_BYTES = 512 * 1024

# The event topic is the system's history: stats can be rebuilt by replaying it from offset 0, so Kafka
# must never delete from it. Replication comes from the broker's default.replication.factor.
TOPIC_CONFIGS = {"retention.ms": "-1", "retention.bytes": "-1"}


def security_options(settings: BusSettings) -> dict[str, Any]:
    """kafka-python's connection security options from the settings (the same for every client)."""
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol == "SSL":
        options.update(
            ssl_cafile=settings.kafka_ssl_cafile,
            ssl_certfile=settings.kafka_ssl_certfile,
            ssl_keyfile=settings.kafka_ssl_keyfile,
        )
    return options


def ensure_topic(
    bootstrap_servers: str,
    topic: str,
    partitions: int,
    *,
    client_id: str = "vrs-admin",
    timeout: float = 30,
    security: dict[str, Any] | None = None,
) -> list[int]:
    """Create ``topic`` with ``partitions`` partitions unless it exists; return its partition ids once every
    partition has a leader. An existing topic keeps its partition count, as in Kafka generally."""
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        bootstrap_timeout_ms=CONNECT_TIMEOUT * 1000,
        request_timeout_ms=REQUEST_TIMEOUT * 1000,
        **(security or {}),
    )
    try:
        result = admin.create_topics(
            {topic: {"num_partitions": partitions, "configs": TOPIC_CONFIGS}}, raise_errors=False
        )
        for created in result["topics"]:
            code = created["error_code"]
            if code not in (0, TopicAlreadyExistsError.errno):
                raise for_code(code)(f"creating topic {topic!r}: {created.get('error_message')}")
        admin.wait_for_topics([topic], timeout_ms=int(timeout * 1000))
        (described,) = admin.describe_topics([topic])
        return sorted(int(p["partition_index"]) for p in described["partitions"])
    finally:
        admin.close()


def close_producer(producer: KafkaProducer, timeout: float) -> None:
    """Close ``producer``, giving what it still holds up to ``timeout`` s to be delivered, then stop it regardless:
    its network thread ends and the records left fail (their outbox rows are still unpublished, so they go again).

    kafka-python 3's ``close()`` flushes first, and raises when the flush times out (the broker is away) before it
    stops the network thread. A publish that failed in an outage left its producer like that: the thread, its
    connections and its records lived on, retrying the broker, after the relay had moved to a new producer. So on
    that timeout the thread is force-closed here, as ``close()`` goes on to do when its flush returns.
    """
    try:
        producer.close(timeout=timeout)
        return
    except KafkaTimeoutError:
        pass
    sender = producer._sender  # no public call abandons a producer's records: its own attribute
    sender.force_close()  # fails every record not yet acknowledged, then closes the connections
    sender.join(REQUEST_TIMEOUT)
    producer.close(timeout=0)  # the flush finds every record done now; the rest of close() runs


class KafkaPublisher:
    """A :class:`~shared.bus.Publisher` on Kafka; messages are partitioned by key (Kafka's murmur2)."""

    def __init__(self, settings: BusSettings, *, topic: str | None = None) -> None:
        self._settings = settings
        self._topic = topic or settings.topic
        self._producer: Any = None
        self._lock = threading.Lock()  # one publish at a time; guards the lazily created producer

    def _get_producer(self) -> Any:
        if self._producer is None:
            s = self._settings
            ensure_topic(
                s.kafka_bootstrap_servers,
                self._topic,
                s.partitions,
                client_id=f"{s.kafka_client_id}-admin",
                security=security_options(s),
            )
            self._producer = KafkaProducer(
                **security_options(s),
                bootstrap_servers=s.kafka_bootstrap_servers,
                client_id=f"{s.kafka_client_id}-publisher",
                enable_idempotence=True,
                acks="all",
                allow_auto_create_topics=False,
                bootstrap_timeout_ms=CONNECT_TIMEOUT * 1000,
                max_block_ms=CONNECT_TIMEOUT * 1000,
                request_timeout_ms=REQUEST_TIMEOUT * 1000,
                delivery_timeout_ms=DELIVERY_TIMEOUT * 1000,
                # A publish hands over a whole outbox batch and then flushes it: nothing leaves before the flush
                # (linger), and each partition's share of the batch fits one record batch, so the batch goes as
                # one produce request instead of dozens of 16 KiB ones started while the rest is still being
                # appended. Measured (500 messages of 450 bytes a publish): 2× the messages/s, 35 % less CPU.
                linger_ms=LINGER_UNTIL_FLUSH_MS,
                batch_size=BATCH_BYTES,
            )
        return self._producer

    def _discard_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                close_producer(producer, timeout=0)

    def _publish(self, messages: Sequence[OutgoingMessage]) -> None:
        with self._lock:
            producer = self._get_producer()
            try:
                futures = [producer.send(self._topic, key=m.key.encode(), value=m.value) for m in messages]
                producer.flush(timeout=DELIVERY_TIMEOUT + REQUEST_TIMEOUT)
                for future in futures:
                    future.get(timeout=DELIVERY_TIMEOUT + REQUEST_TIMEOUT)
            except Exception:
                # Some messages may have been stored anyway: the caller retries, which is at-least-once.
                # A fresh producer for the retry avoids inheriting a wedged idempotence sequence.
                self._discard_producer()
                raise

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if messages:
            await asyncio.to_thread(self._publish, list(messages))

    def _close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
            if producer is not None:
                close_producer(producer, timeout=REQUEST_TIMEOUT)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)


class KafkaSource:
    """A :class:`~shared.bus.Source` on Kafka for the consumer named ``consumer`` (its client id)."""

    def __init__(self, settings: BusSettings, *, consumer: str, topic: str | None = None) -> None:
        self._settings = settings
        self._topic = topic or settings.topic
        self._client_id = f"{settings.kafka_client_id}-{consumer}"
        self._consumer: Any = None
        self._lock = threading.Lock()  # the KafkaConsumer is used by one thread at a time
        self._group: str | None = None
        self._owned: set[int] = set()
        self._pending: Assignment | None = None
        # When this member joined, or last lost its partitions, without the group's next assignment since
        # (monotonic); None otherwise. Written on the polling thread, read by the consumer's loop.
        self._rebalance_since: float | None = None

    def _get_consumer(self) -> Any:
        if self._consumer is None:
            session_ms = int(self._settings.group_session_seconds * 1000)
            self._consumer = KafkaConsumer(
                **security_options(self._settings),
                bootstrap_servers=self._settings.kafka_bootstrap_servers,
                client_id=self._client_id,
                group_id=self._group,
                enable_auto_commit=False,
                # An offset the topic does not have raises OffsetOutOfRangeError. In a group, a partition's
                # position until the member seeks it is irrelevant (it is paused): "earliest" avoids an
                # error for a partition the group never committed.
                auto_offset_reset="none" if self._group is None else "earliest",
                allow_auto_create_topics=False,
                bootstrap_timeout_ms=CONNECT_TIMEOUT * 1000,
                session_timeout_ms=session_ms,
                heartbeat_interval_ms=max(1000, session_ms // 3),
                fetch_min_bytes=self._settings.kafka_fetch_min_bytes,
                fetch_max_wait_ms=self._settings.kafka_fetch_max_wait_ms,
            )
            if self._group is not None:
                # The topic's partitions in this client's metadata before it joins: a leader that assigns
                # without them gives everyone nothing, then rejoins when its metadata arrives — a second
                # rebalance right behind the first, in which a member was seen dropped mid-join.
                self._consumer.partitions_for_topic(self._topic)
                self._consumer.subscribe([self._topic], listener=_Rebalance(self))
        return self._consumer

    # Called by kafka-python inside poll(), on the thread that holds the lock.
    def _revoked(self, partitions: set[int]) -> None:
        if self._rebalance_since is None:
            self._rebalance_since = time.monotonic()
        pending = self._pending or Assignment()
        self._owned -= partitions
        pending.owned = set(self._owned)
        pending.added -= partitions
        pending.revoked |= partitions
        self._pending = pending

    def _assigned(self, partitions: set[int]) -> None:
        # kafka-python calls this after every completed join, with nothing too: the rebalance is over.
        self._rebalance_since = None
        if partitions:
            self._consumer.pause(*(TopicPartition(self._topic, p) for p in partitions))
        pending = self._pending or Assignment()
        self._owned |= partitions
        pending.owned = set(self._owned)
        pending.added |= partitions
        self._pending = pending

    async def join(self, group: str) -> None:
        if self._consumer is not None:
            raise RuntimeError("join() must come before the source is used")
        # The topic must exist before the group's first assignment, or the member gets no partitions until
        # its metadata next refreshes (minutes).
        await self.partitions()
        self._group = group
        self._rebalance_since = time.monotonic()
        await asyncio.to_thread(self._locked_get)

    def rebalancing_for(self) -> float | None:
        since = self._rebalance_since
        return None if since is None else time.monotonic() - since

    def _locked_get(self) -> None:
        with self._lock:
            self._get_consumer()

    def take_assignment(self) -> Assignment | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def _commit(self, positions: dict[int, int]) -> None:
        with self._lock:
            if self._consumer is None:
                return
            offsets = {
                TopicPartition(self._topic, p): OffsetAndMetadata(o, "", -1)
                for p, o in positions.items()
                if p in self._owned
            }
            if offsets:
                self._consumer.commit(offsets)

    async def commit(self, positions: dict[int, int]) -> None:
        if self._group is not None and positions:
            await asyncio.to_thread(self._commit, dict(positions))

    def _end_offsets(self) -> dict[int, int]:
        with self._lock:
            consumer = self._get_consumer()
            tps = [TopicPartition(self._topic, p) for p in sorted(consumer_partitions(consumer))]
            if not tps:
                return {}
            ends = consumer.end_offsets(tps, timeout_ms=REQUEST_TIMEOUT * 1000)
        return {tp.partition: int(o) for tp, o in ends.items()}

    async def end_offsets(self) -> dict[int, int]:
        return await asyncio.to_thread(self._end_offsets)

    async def partitions(self) -> list[int]:
        s = self._settings
        return await asyncio.to_thread(
            ensure_topic,
            s.kafka_bootstrap_servers,
            self._topic,
            s.partitions,
            client_id=f"{self._client_id}-admin",
            security=security_options(s),
        )

    def _assign(self, positions: dict[int, int]) -> None:
        with self._lock:
            consumer = self._get_consumer()
            if self._group is not None:
                # Only what the group still gives this member (a rebalance may have come in between).
                mine = {p: TopicPartition(self._topic, p) for p in sorted(positions) if p in self._owned}
                for p, tp in mine.items():
                    consumer.seek(tp, positions[p])
                if mine:
                    consumer.resume(*mine.values())
                return
            assignment = {p: TopicPartition(self._topic, p) for p in sorted(positions)}
            consumer.assign(list(assignment.values()))
            for p, tp in assignment.items():
                consumer.seek(tp, positions[p])

    async def assign(self, positions: dict[int, int]) -> None:
        await asyncio.to_thread(self._assign, dict(positions))

    def _poll(self, max_records: int, timeout: float) -> list[Message]:
        with self._lock:
            batches = self._get_consumer().poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        messages = []
        for tp in sorted(batches, key=lambda tp: tp.partition):
            for record in sorted(batches[tp], key=lambda r: r.offset):
                key = record.key.decode() if record.key is not None else ""
                value = record.value if record.value is not None else b""
                messages.append(Message(partition=tp.partition, offset=record.offset, key=key, value=value))
        return messages

    async def poll(self, *, max_records: int, timeout: float) -> list[Message]:
        return await asyncio.to_thread(self._poll, max_records, timeout)

    def _close(self) -> None:
        with self._lock:
            consumer, self._consumer = self._consumer, None
            if consumer is not None:
                consumer.close(autocommit=False)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)


def consumer_partitions(consumer: Any) -> set[int]:
    """The partitions a KafkaConsumer reads now (its group assignment or manual assignment)."""
    return {tp.partition for tp in consumer.assignment()}


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._source._revoked({tp.partition for tp in revoked})

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._source._assigned({tp.partition for tp in assigned})
