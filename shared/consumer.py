"""The idempotent consumer: each event of a topic takes effect exactly once in one database.

One polled batch is one database transaction holding the effects, the ids of the events applied and the
next offset per partition. The bus's in-memory position is never trusted beyond that transaction: after any
error the source is closed and reopened at the offsets the database holds, so a crash at any point neither
loses an event nor applies one twice, and a redelivered event is recognised by its id.

The tables live in the consumer's own database (:func:`consumer_tables`); what an event *does* is the
handler's business (:data:`Handler`): it decodes the messages, claims their event ids with
:meth:`Bookkeeping.claim` and applies the new ones, all in the session it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime

from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, String, Table, Uuid, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.bus import Message, Source
from shared.db import Database, upsert, utcnow

log = logging.getLogger(__name__)

# Applies one batch in the given session; returns how many events took effect (repeats excluded).
Handler = Callable[[AsyncSession, Sequence[Message]], Awaitable[int]]
SourceFactory = Callable[[], Source]


def consumer_tables(metadata: MetaData) -> tuple[Table, Table]:
    """``processed_events`` and ``consumer_offsets``, created by the consuming service's migrations."""
    processed = Table(
        "processed_events",
        metadata,
        Column("consumer", String(64), primary_key=True),
        Column("event_id", Uuid, primary_key=True),
        Column("processed_at", DateTime(timezone=True), nullable=False),
    )
    offsets = Table(
        "consumer_offsets",
        metadata,
        Column("consumer", String(64), primary_key=True),
        Column("topic", String(249), primary_key=True),  # 249: Kafka's longest topic name
        Column("partition", Integer, primary_key=True),
        Column("next_offset", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    return processed, offsets


class Bookkeeping:
    """The consumer's own rows. Each call is one statement; the caller's transaction holds them together."""

    def __init__(self, session: AsyncSession, tables: tuple[Table, Table]) -> None:
        self.session = session
        self.processed, self.offsets_table = tables

    async def offsets(self, consumer: str, topic: str) -> dict[int, int]:
        t = self.offsets_table
        stmt = select(t.c.partition, t.c.next_offset).where(t.c.consumer == consumer, t.c.topic == topic)
        return {int(p): int(o) for p, o in (await self.session.execute(stmt)).all()}

    async def claim(self, consumer: str, event_ids: Sequence[uuid.UUID], *, at: datetime) -> set[uuid.UUID]:
        """Record ``event_ids`` as processed; return those that were not already (the ones to apply)."""
        if not event_ids:
            return set()
        t = self.processed
        stmt = (
            upsert(self.session, t)
            .on_conflict_do_nothing(index_elements=["consumer", "event_id"])
            .returning(t.c.event_id)
        )
        params = [{"consumer": consumer, "event_id": e, "processed_at": at} for e in sorted(set(event_ids))]
        return set((await self.session.execute(stmt, params)).scalars())

    async def store_offsets(self, consumer: str, topic: str, positions: Mapping[int, int], *, at: datetime) -> None:
        if not positions:
            return
        stmt = upsert(self.session, self.offsets_table)
        stmt = stmt.on_conflict_do_update(
            index_elements=["consumer", "topic", "partition"],
            set_={"next_offset": stmt.excluded.next_offset, "updated_at": stmt.excluded.updated_at},
        )
        params = [
            {"consumer": consumer, "topic": topic, "partition": p, "next_offset": o, "updated_at": at}
            for p, o in sorted(positions.items())
        ]
        await self.session.execute(stmt, params)


def next_offsets(messages: Sequence[Message]) -> dict[int, int]:
    """The next offset to read per partition after ``messages``."""
    out: dict[int, int] = {}
    for m in messages:
        out[m.partition] = max(out.get(m.partition, 0), m.offset + 1)
    return out


class IdempotentConsumer:
    def __init__(
        self,
        database: Database,
        tables: tuple[Table, Table],
        *,
        name: str,
        topic: str,
        source_factory: SourceFactory,
        handler: Handler,
        max_records: int = 500,
        poll_timeout: float = 1.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.database = database
        self._on_commit = on_commit
        self.tables = tables
        self.name = name
        self.topic = topic
        self.max_records = max_records
        self.poll_timeout = poll_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._source_factory = source_factory
        self._handler = handler
        self._source: Source | None = None
        self._task: asyncio.Task[None] | None = None

    async def _open(self) -> Source:
        """A source positioned at the offsets committed with the effects (0 for a partition never read)."""
        if self._source is not None:
            return self._source
        source = self._source_factory()
        try:
            partitions = await source.partitions()
            async with self.database.sessionmaker() as session:
                stored = await Bookkeeping(session, self.tables).offsets(self.name, self.topic)
            await source.assign({p: stored.get(p, 0) for p in partitions})
        except BaseException:
            with contextlib.suppress(Exception):
                await source.close()
            raise
        self._source = source
        return source

    async def _reset(self) -> None:
        """Forget the source: its position may be ahead of what the database committed."""
        source, self._source = self._source, None
        if source is not None:
            try:
                await source.close()
            except Exception:
                log.warning("closing the event source failed", exc_info=True)

    async def step(self, *, timeout: float | None = None) -> int | None:
        """Poll once and apply the batch in one transaction; the events applied, or None when nothing came."""
        try:
            source = await self._open()
            messages = await source.poll(
                max_records=self.max_records, timeout=self.poll_timeout if timeout is None else timeout
            )
            if not messages:
                return None
            async with self.database.sessionmaker() as session, session.begin():
                applied = await self._handler(session, messages)
                await Bookkeeping(session, self.tables).store_offsets(
                    self.name, self.topic, next_offsets(messages), at=utcnow()
                )
        except BaseException:
            # Cancellation included: a batch cut off mid-transaction was rolled back, so the source must not
            # go on from where it had read to.
            await asyncio.shield(self._reset())
            raise
        if self._on_commit is not None and applied:
            self._on_commit(applied)
        return applied

    async def drain(self, *, idle: float = 0.0) -> int:
        """Apply batches until a poll brings nothing within ``idle`` seconds; return the events applied."""
        applied = 0
        while (n := await self.step(timeout=idle)) is not None:
            applied += n
        return applied

    async def run(self) -> None:
        """Apply batches until cancelled; on errors back off (doubling, capped) and resume from the database."""
        delay = self.retry_initial
        try:
            while True:
                try:
                    await self.step()
                except Exception:
                    log.exception("consumer %s (%s) batch failed; retrying in %.1fs", self.name, self.topic, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.retry_max)
                else:
                    delay = self.retry_initial
        finally:
            await asyncio.shield(self._reset())

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"consumer-{self.name}-{self.topic}")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._reset()


def stored_positions(consumer: IdempotentConsumer) -> Callable[[], Awaitable[dict[int, int]]]:
    """The offsets ``consumer`` committed with its effects, read fresh each call (for the lag metric)."""

    async def positions() -> dict[int, int]:
        async with consumer.database.sessionmaker() as session:
            return await Bookkeeping(session, consumer.tables).offsets(consumer.name, consumer.topic)

    return positions
