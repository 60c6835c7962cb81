"""The outbox relay: publishes unpublished events of every shard to the bus, then marks them.

At-least-once by construction: rows are marked only after the bus acknowledged them, so a crash between
the two publishes them again and the consumer's processed-event ids absorb the repeat. Rows are claimed
``FOR UPDATE SKIP LOCKED``, so several relays (replicas) share the work without waiting on each other.
A relay sleeps until a commit in its own process wakes it for the shards it wrote, or ``idle_seconds`` pass
(then it looks at every shard, for events written by other replicas). Wake-ups within ``linger_seconds``
are gathered into one pass, so under load one publish carries many events instead of one scan per dose.
A bus outage only delays events, which wait in the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from prometheus_client import Counter, Gauge

from services.records.repository import OutboxRepository
from shared.bus import OutgoingMessage, Publisher
from shared.db import Database, Databases, utcnow

log = logging.getLogger(__name__)

PUBLISHED = Counter("vrs_outbox_published_total", "Outbox events published", ["shard"])
FAILURES = Counter("vrs_outbox_publish_failures_total", "Failed outbox publish attempts", ["shard"])
BACKLOG = Gauge("vrs_outbox_last_batch_size", "Size of the last published outbox batch", ["shard"])


class OutboxRelay:
    def __init__(
        self,
        databases: Databases,
        publisher: Publisher,
        *,
        batch_size: int,
        idle_seconds: float,
        linger_seconds: float = 0.005,
        retention: timedelta = timedelta(days=1),
    ) -> None:
        self._linger = linger_seconds
        self._dirty: set[str] = set()
        self._databases = databases
        self._retention = retention
        self._next_purge = 0.0
        self._publisher = publisher
        self._batch_size = batch_size
        self._idle = idle_seconds
        self._wake = asyncio.Event()

    def wake(self, *shards: str) -> None:
        """Events were committed in ``shards`` (all shards when none are named)."""
        self._dirty.update(shards or self._databases.shards)
        self._wake.set()

    async def publish_pending(self, name: str, db: Database) -> int:
        """Publish one batch of this shard's outbox; the number of events published."""
        async with db.sessionmaker() as session, session.begin():
            outbox = OutboxRepository(session)
            rows = await outbox.claim_unpublished(self._batch_size)
            if not rows:
                return 0
            await self._publisher.publish([OutgoingMessage(key=row.key, value=row.payload) for row in rows])
            await outbox.mark_published([row.id for row in rows])
        PUBLISHED.labels(name).inc(len(rows))
        BACKLOG.labels(name).set(len(rows))
        return len(rows)

    async def drain(self) -> int:
        """Publish until every shard's outbox is empty (used by tests and at shutdown)."""
        total = 0
        for name, db in self._databases.shards.items():
            while n := await self.publish_pending(name, db):
                total += n
        return total

    async def purge(self) -> None:
        for db in self._databases.shards.values():
            async with db.sessionmaker() as session, session.begin():
                await OutboxRepository(session).purge_published(utcnow() - self._retention)

    async def run(self) -> None:
        backoff = 0.5
        due = set(self._databases.shards)
        while True:
            if time.monotonic() >= self._next_purge:
                self._next_purge = time.monotonic() + 600
                try:
                    await self.purge()
                except Exception as exc:
                    log.warning("outbox purge failed (%s)", type(exc).__name__)
            busy: set[str] = set()
            for name in sorted(due):
                try:
                    if await self.publish_pending(name, self._databases.shards[name]) == self._batch_size:
                        busy.add(name)
                    backoff = 0.5
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    FAILURES.labels(name).inc()
                    log.warning(
                        "outbox relay for shard %s failed (%s); retrying in %.1fs", name, type(exc).__name__, backoff
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    busy.add(name)
            if busy:
                due = busy
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._idle)
                await asyncio.sleep(self._linger)
            except TimeoutError:
                self._dirty.update(self._databases.shards)
            self._wake.clear()
            due, self._dirty = self._dirty, set()
