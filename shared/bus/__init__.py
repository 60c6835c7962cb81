"""The event bus (registry → records → stats): one interface, two implementations.

- :mod:`shared.bus.kafka` — Apache Kafka through kafka-python (production).
- :mod:`shared.bus.embedded` — a durable append-only log in a SQLite file (the embedded default).

Both are at-least-once: a publisher may deliver a message twice and a consumer sees each message at least
once. Consumers therefore keep their own positions (in the same transaction as their effects) and tell the
source where to start; the bus never decides on their behalf what has been processed.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.settings import BusSettings


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Message:
    partition: int
    offset: int
    key: str
    value: bytes


class Publisher(Protocol):
    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Return only once every message is durably stored by the bus, in order per key."""

    async def close(self) -> None: ...


class Source(Protocol):
    async def partitions(self) -> list[int]:
        """The topic's partitions (creating the topic if the bus allows it)."""

    async def assign(self, positions: dict[int, int]) -> None:
        """Read these partitions, each from the given offset (the next offset to process)."""

    async def poll(self, *, max_records: int, timeout: float) -> list[Message]:
        """The next messages, in offset order per partition; an empty list after ``timeout`` seconds."""

    async def close(self) -> None: ...


def partition_for(key: str, partitions: int) -> int:
    """Stable key → partition (the embedded log's; Kafka uses its own murmur2 partitioner)."""
    return zlib.crc32(key.encode()) % partitions


def make_publisher(settings: BusSettings, *, topic: str | None = None) -> Publisher:
    """A publisher to ``topic`` (default: the dose topic, ``settings.topic``)."""
    if settings.kind == "kafka":
        from shared.bus.kafka import KafkaPublisher

        return KafkaPublisher(settings, topic=topic)
    from shared.bus.embedded import EmbeddedLog

    return EmbeddedLog(settings, topic=topic)


def make_source(settings: BusSettings, *, consumer: str, topic: str | None = None) -> Source:
    """A source reading ``topic`` (default: the dose topic, ``settings.topic``) for ``consumer``."""
    if settings.kind == "kafka":
        from shared.bus.kafka import KafkaSource

        return KafkaSource(settings, consumer=consumer, topic=topic)
    from shared.bus.embedded import EmbeddedLog

    return EmbeddedLog(settings, topic=topic)
