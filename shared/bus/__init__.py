"""The event bus (registry → records → stats): one interface, two implementations.

- :mod:`shared.bus.kafka` — Apache Kafka through kafka-python (production).
- :mod:`shared.bus.embedded` — a durable append-only log in a SQLite file (the embedded default).

Both are at-least-once: a publisher may deliver a message twice and a consumer sees each message at least
once. Consumers therefore keep their own positions (in the same transaction as their effects) and tell the
source where to start; the bus never decides on their behalf what has been processed.

A source either reads the partitions it is told (:meth:`Source.assign`) or, after :meth:`Source.join`,
shares them with the other members of a group: on Kafka a consumer group (partitions rebalance as members
join and leave), in the embedded log a lease on the whole topic (one member reads, the others stand by and
take over when it stops renewing). Either way, partitions a member is given arrive paused: the member
learns of them from :meth:`Source.take_assignment`, reads its own positions and starts them with
:meth:`Source.assign`. What the bus itself remembers (:meth:`Source.commit`) is only a lag signal for
operators, never where reading resumes.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
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


@dataclass
class Assignment:
    """A change of a group member's partitions since it last asked."""

    owned: set[int] = field(default_factory=set)  # every partition the member now holds
    added: set[int] = field(default_factory=set)  # given since; paused until positioned with assign()
    revoked: set[int] = field(default_factory=set)  # taken away since; drop what was read from them


class Publisher(Protocol):
    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Return only once every message is durably stored by the bus, in order per key."""

    async def close(self) -> None: ...


class Source(Protocol):
    async def partitions(self) -> list[int]:
        """The topic's partitions (creating the topic if the bus allows it)."""

    async def assign(self, positions: dict[int, int]) -> None:
        """Read these partitions, each from the given offset (the next offset to process).

        After :meth:`join`, only partitions the group gave this member, which start reading here.
        """

    async def join(self, group: str) -> None:
        """Share the topic's partitions with the other sources that join ``group``."""

    def take_assignment(self) -> Assignment | None:
        """The change of partitions since the last call (group members only); None when there was none."""

    def rebalancing_for(self) -> float | None:
        """Seconds since this member joined or lost its partitions without the group's next assignment having
        come (group members only); None when it is not waiting for one."""

    async def commit(self, positions: dict[int, int]) -> None:
        """Tell the bus how far this group got — for lag monitoring only, after the consumer's own commit."""

    async def end_offsets(self) -> dict[int, int]:
        """Per partition this source reads, the offset the next published message will get."""

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
