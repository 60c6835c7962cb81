"""The idempotent consumer: each event of a topic takes effect exactly once in one database.

One polled batch is one database transaction holding the effects, the ids of the events applied and the
next offset per partition (or its first messages only, when the handler says it took no more: :class:`Taken`;
the rest go to the next transactions). The bus's in-memory position is never trusted beyond that
transaction: after any error the source is closed and reopened at the offsets the database holds, so a crash
at any point neither loses an event nor applies one twice, and a redelivered event is recognised by its id.

The tables live in the consumer's own database (:func:`consumer_tables`); what an event *does* is the
handler's business (:data:`Handler`): it decodes the messages, claims their event ids with
:meth:`Bookkeeping.claim` and applies the new ones, all in the session it is given.

Several processes can share a topic's partitions: with ``group`` set, the source joins a group on the bus (a
Kafka consumer group; the embedded log's lease) and each member applies the partitions it is given,
positioned at the offsets the database holds — a partition moving between members resumes exactly where the
last database commit left it. Offsets only move forward, so a member that applied a batch just before
losing its partitions cannot undo the new owner's progress. After a database commit the offsets are also
committed to the bus (at most once per ``bus_commit_interval``: a later step commits the rest), only so that
operators see the group's lag there; a member killed between the two commits leaves the bus's offsets
behind, which costs nothing because they are never read back.

Processed ids do not pile up for ever when the tables keep where each event was read
(``consumer_tables(..., positions=True)``): :meth:`IdempotentConsumer.prune` forgets those far behind the
committed offsets and old enough that no redelivery can still bring them (see :meth:`Bookkeeping.prune`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, MetaData, String, Table, Uuid, case, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.bus import Message, Source
from shared.db import Database, upsert, upsert_many, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Taken:
    """A handler's answer when it applied only the batch's first ``messages`` (at least one): the consumer
    commits the offsets of those alone and hands the rest, in order, to the next steps before it polls again.
    A handler whose batch can lock without bound (records' coupon events, each moving its coupon's doses)
    keeps every transaction short this way, and with it what a writer of those rows may have to wait for."""

    applied: int
    messages: int


# Applies one batch in the given session; returns how many events took effect (repeats excluded), or what it
# took of the batch (:class:`Taken`).
Handler = Callable[[AsyncSession, Sequence[Message]], Awaitable["int | Taken"]]
# The same on the batch transaction's asyncpg connection itself (PostgreSQL; see IdempotentConsumer).
DriverHandler = Callable[[Any, Sequence[Message]], Awaitable["int | Taken"]]
SourceFactory = Callable[[], Source]
# Event id → (partition, offset) of the message it was first read from.
Positions = Mapping[uuid.UUID, tuple[int, int]]


def consumer_tables(metadata: MetaData, *, positions: bool = False) -> tuple[Table, Table]:
    """``processed_events`` and ``consumer_offsets``, created by the consuming service's migrations.

    With ``positions``, each processed id also keeps where it was read, which lets old ids be pruned.
    """
    position_columns: list[Column[int] | Index] = (
        [
            Column("event_partition", Integer),
            Column("event_offset", BigInteger),
            Index("ix_processed_events_position", "consumer", "event_partition", "event_offset"),
        ]
        if positions
        else []
    )
    processed = Table(
        "processed_events",
        metadata,
        Column("consumer", String(64), primary_key=True),
        Column("event_id", Uuid, primary_key=True),
        Column("processed_at", DateTime(timezone=True), nullable=False),
        *position_columns,
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
        self.has_positions = "event_offset" in self.processed.c

    async def offsets(self, consumer: str, topic: str) -> dict[int, int]:
        t = self.offsets_table
        stmt = select(t.c.partition, t.c.next_offset).where(t.c.consumer == consumer, t.c.topic == topic)
        return {int(p): int(o) for p, o in (await self.session.execute(stmt)).all()}

    async def claim(self, consumer: str, event_ids: Sequence[uuid.UUID] | Positions, *, at: datetime) -> set[uuid.UUID]:
        """Record the events as processed; return the ids that were not already (the ones to apply).

        Give a mapping id → (partition, offset) to keep where each was read (tables with positions).
        ``ON CONFLICT DO NOTHING … RETURNING`` answers in one statement (the ids as arrays on PostgreSQL, see
        :func:`shared.db.upsert_many`) and stays right when two consumers race for the same event: on
        PostgreSQL the second waits for the first to commit and gets nothing.
        """
        if not event_ids:
            return set()
        t = self.processed
        where = event_ids if isinstance(event_ids, Mapping) else {}
        # Sorted: concurrent consumers then take row locks in one order.
        params = []
        for e in sorted(set(event_ids)):
            row: dict[str, object] = {"consumer": consumer, "event_id": e, "processed_at": at}
            if self.has_positions:
                row["event_partition"], row["event_offset"] = where.get(e, (None, None))
            params.append(row)
        stmt, rows = upsert_many(self.session, t, params)
        stmt = stmt.on_conflict_do_nothing(index_elements=["consumer", "event_id"]).returning(t.c.event_id)
        return set((await self.session.execute(stmt, rows)).scalars())

    async def store_offsets(self, consumer: str, topic: str, positions: Mapping[int, int], *, at: datetime) -> None:
        """Store the next offsets, never moving one backwards (a member that lost a partition meanwhile)."""
        if not positions:
            return
        t = self.offsets_table
        stmt = upsert(self.session, t)
        forward = case((stmt.excluded.next_offset > t.c.next_offset, stmt.excluded.next_offset), else_=t.c.next_offset)
        stmt = stmt.on_conflict_do_update(
            index_elements=["consumer", "topic", "partition"],
            set_={"next_offset": forward, "updated_at": stmt.excluded.updated_at},
        )
        params = [
            {"consumer": consumer, "topic": topic, "partition": p, "next_offset": o, "updated_at": at}
            for p, o in sorted(positions.items())
        ]
        await self.session.execute(stmt, params)

    async def prune(self, consumer: str, topic: str, *, keep_offsets: int, before: datetime) -> int:
        """Forget processed ids no redelivery can still bring; return how many.

        An id is needed only to recognise the same event published again. Readers never go back behind
        their committed offsets (offsets only move forward), so a second copy can only come from a
        publisher sending it again, which lands *after* the first copy — within a short time (a relay's
        restart) and a bounded distance. An id is therefore forgotten only when it lies more than
        ``keep_offsets`` messages behind its partition's committed offset *and* was processed before
        ``before``: both windows must have passed. Ids without a position are kept.
        """
        if not self.has_positions:
            return 0
        p = self.processed.c
        deleted = 0
        for partition, offset in sorted((await self.offsets(consumer, topic)).items()):
            if offset - keep_offsets <= 0:
                continue
            result = await self.session.execute(
                delete(self.processed).where(
                    p.consumer == consumer,
                    p.event_partition == partition,
                    p.event_offset < offset - keep_offsets,
                    p.processed_at < before,
                )
            )
            deleted += int(getattr(result, "rowcount", 0) or 0)
        return deleted


class DriverBookkeeping:
    """:class:`Bookkeeping`'s :meth:`~Bookkeeping.claim` and :meth:`~Bookkeeping.store_offsets` on an asyncpg
    connection, in its transaction (PostgreSQL): the same rows and answers, one prepared statement each, the
    ids and offsets as arrays."""

    def __init__(self, connection: Any, tables: tuple[Table, Table]) -> None:
        self.connection = connection
        processed, offsets = tables
        self.has_positions = "event_offset" in processed.c
        columns = values = arrays = names = ""
        if self.has_positions:
            columns, values, names = ", event_partition, event_offset", ", e.p, e.o", ", p, o"
            arrays = ", $4::integer[], $5::bigint[]"
        # Rows in id order: concurrent consumers then take the rows' locks in one order (as Bookkeeping does).
        self._claim = (
            f"INSERT INTO {processed.name} (consumer, event_id, processed_at{columns}) "
            f"SELECT $1, e.id, $2{values} FROM unnest($3::uuid[]{arrays}) AS e(id{names}) "
            "ORDER BY e.id ON CONFLICT (consumer, event_id) DO NOTHING RETURNING event_id"
        )
        self._store = (
            f"INSERT INTO {offsets.name} (consumer, topic, partition, next_offset, updated_at) "
            "SELECT $1, $2, x.p, x.o, $3 FROM unnest($4::integer[], $5::bigint[]) AS x(p, o) ORDER BY x.p "
            "ON CONFLICT (consumer, topic, partition) DO UPDATE SET updated_at = excluded.updated_at, "
            f"next_offset = greatest({offsets.name}.next_offset, excluded.next_offset)"
        )

    async def claim(self, consumer: str, event_ids: Sequence[uuid.UUID] | Positions, *, at: datetime) -> set[uuid.UUID]:
        """As :meth:`Bookkeeping.claim`."""
        if not event_ids:
            return set()
        ids = list(event_ids)
        args: list[Any] = [consumer, at, ids]
        if self.has_positions:
            where = event_ids if isinstance(event_ids, Mapping) else {}
            places = [where.get(e, (None, None)) for e in ids]
            args += [[p for p, _ in places], [o for _, o in places]]
        return {row[0] for row in await self.connection.fetch(self._claim, *args)}

    async def store_offsets(self, consumer: str, topic: str, positions: Mapping[int, int], *, at: datetime) -> None:
        """As :meth:`Bookkeeping.store_offsets`."""
        if positions:
            await self.connection.execute(self._store, consumer, topic, at, list(positions), list(positions.values()))


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
        driver_handler: DriverHandler | None = None,
        max_records: int = 500,
        poll_timeout: float = 1.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        on_commit: Callable[[int], None] | None = None,
        group: str | None = None,
        lag_interval: float = 5.0,
        prune_interval: float = 300.0,
        keep_offsets: int = 1_000_000,
        keep_seconds: float = 7 * 24 * 3600,
        on_error: Callable[[], None] | None = None,
        on_positions: Callable[[dict[int, int], set[int]], None] | None = None,
        on_lag: Callable[[int, int], None] | None = None,
        bus_commit_interval: float = 1.0,
        rebalance_timeout: float = 330.0,
        linger: float = 0.0,
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
        # On PostgreSQL a batch's transaction runs on the asyncpg connection itself when the handler has a
        # version for it: through a session, stats' four statements and commit cost it 2.2 ms of CPU for a
        # one-event batch, on the connection 0.7 ms (python -m devtools.bench loops), and below full speed a
        # batch is a dose or two.
        self._driver_handler = driver_handler if database.engine.dialect.name == "postgresql" else None
        self._source: Source | None = None
        self._task: asyncio.Task[None] | None = None
        # ``group``: share the partitions with the other members of this group on the bus.
        self.group = group
        self.lag_interval = lag_interval
        self.prune_interval = prune_interval
        self.keep_offsets = keep_offsets
        self.keep_seconds = keep_seconds
        self._on_error = on_error
        self._on_positions = on_positions
        self._on_lag = on_lag
        # The partitions held and their committed next offsets.
        self.positions: dict[int, int] = {}
        self._lag_due = 0.0
        # The bus's offsets are a lag signal for operators: committed at most once per interval (each is a write
        # on the broker and a round trip that holds up the next poll), the latest positions at each.
        self.bus_commit_interval = bus_commit_interval
        self._bus_pending: dict[int, int] = {}
        self._bus_committed = -float("inf")  # when the last commit to the bus went out (monotonic)
        self._prune_due = time.monotonic() + prune_interval
        # A group member still without the group's assignment this long after joining or losing its partitions
        # leaves and joins again. Past Kafka's own rebalance timeout (kafka-python's max_poll_interval, 300 s)
        # the group has settled or dropped it, so a slow peer never triggers it; a join seen stalled in CI
        # (the broker had expired the member, the client never noticed) would otherwise hold it for good.
        self.rebalance_timeout = rebalance_timeout
        # After a batch smaller than max_records, wait this long before polling again: below full speed the
        # next batch then gathers what arrived meanwhile (for up to this much more lag) instead of a transaction
        # and a fetch being paid for every event or two. Never when idle (a poll waits for data anyway).
        self.linger = linger
        self._last_batch = 0
        # What the handler left of the last batch (see Taken): applied before anything is polled again.
        self._held: list[Message] = []

    async def _open(self) -> Source:
        """A source positioned at the offsets committed with the effects (0 for a partition never read).

        In a group the source starts with no partitions; they come (paused) with the group's assignment.
        """
        if self._source is not None:
            return self._source
        source = self._source_factory()
        try:
            if self.group is not None:
                await source.join(self.group)
                positions: dict[int, int] = {}
            else:
                positions = await self._stored(await source.partitions())
                await source.assign(positions)
        except BaseException:
            with contextlib.suppress(Exception):
                await source.close()
            raise
        self._hold(positions)
        self._source = source
        return source

    async def _stored(self, partitions: list[int] | set[int]) -> dict[int, int]:
        async with self.database.sessionmaker() as session:
            stored = await Bookkeeping(session, self.tables).offsets(self.name, self.topic)
        return {p: stored.get(p, 0) for p in sorted(partitions)}

    def _hold(self, positions: dict[int, int]) -> None:
        dropped = set(self.positions) - set(positions)
        self.positions = dict(positions)
        if self._on_positions is not None:
            self._on_positions(dict(positions), dropped)

    async def _rebalanced(self, source: Source, messages: list[Message]) -> list[Message]:
        """Take in a change of the group's assignment; return the messages still this member's to apply."""
        change = source.take_assignment()
        if change is None:
            return messages
        kept = {p: o for p, o in self.positions.items() if p in change.owned and p not in change.added}
        fresh = await self._stored(change.added & change.owned)
        await source.assign(fresh)
        self._hold({**kept, **fresh})
        log.info(
            "consumer %s (%s) now holds partitions %s (given %s, taken %s)",
            self.name,
            self.topic,
            sorted(self.positions),
            sorted(change.added),
            sorted(change.revoked),
        )
        # Anything read from a partition given just now or taken away is left to its (new) owner.
        return [m for m in messages if m.partition in kept]

    async def _reset(self) -> None:
        """Forget the source: its position may be ahead of what the database committed."""
        source, self._source = self._source, None
        self._bus_pending.clear()
        self._held = []
        if source is not None:
            try:
                await source.close()
            except Exception:
                log.warning("closing the event source failed", exc_info=True)

    async def step(self, *, timeout: float | None = None) -> int | None:
        """Poll once and apply the batch in one transaction; the events applied, or None when nothing came.

        What the handler did not take of a batch is applied by the next steps, before the next poll."""
        try:
            source = await self._open()
            if self._held:
                # Read already, after the offsets the database holds: no poll (and so no change of the group's
                # assignment) until they are applied.
                messages, self._held = self._held, []
            else:
                polled = await self._poll(source, timeout)
                if polled is None:
                    return None
                messages = polled
            self._last_batch = len(messages)
            await self._housekeeping(source)
            if not messages:
                await self._signal_lag(source, {})  # what an earlier batch left for the next interval
                return None
            async with self._transaction() as (apply, bookkeeping):
                result = await apply(messages)
                applied, taken = (
                    (result.applied, max(1, min(result.messages, len(messages))))
                    if isinstance(result, Taken)
                    else (result, len(messages))
                )
                positions = next_offsets(messages[:taken])
                await bookkeeping.store_offsets(self.name, self.topic, positions, at=utcnow())
            self._held = list(messages[taken:])
        except BaseException:
            # Cancellation included: a batch cut off mid-transaction was rolled back, so the source must not
            # go on from where it had read to.
            await asyncio.shield(self._reset())
            raise
        self._hold({**self.positions, **{p: max(o, self.positions.get(p, 0)) for p, o in positions.items()}})
        if self._on_commit is not None and applied:
            self._on_commit(applied)
        await self._signal_lag(source, positions)
        return applied

    async def _poll(self, source: Source, timeout: float | None) -> list[Message] | None:
        """The next batch from the bus (in a group: only what is still this member's after a rebalance); None
        when the member, without an assignment for too long, left the group to join it again."""
        messages = await source.poll(
            max_records=self.max_records, timeout=self.poll_timeout if timeout is None else timeout
        )
        if self.group is None:
            return messages
        messages = await self._rebalanced(source, messages)
        waiting = source.rebalancing_for()
        if waiting is not None and waiting > self.rebalance_timeout:
            log.warning(
                "consumer %s (%s) has had no assignment for %.0f s since the group's rebalance began: "
                "leaving and joining again",
                self.name,
                self.topic,
                waiting,
            )
            await self._reset()
            return None
        return messages

    @contextlib.asynccontextmanager
    async def _transaction(
        self,
    ) -> AsyncIterator[tuple[Callable[[Sequence[Message]], Awaitable[int | Taken]], Bookkeeping | DriverBookkeeping]]:
        """A batch's transaction: the handler bound to it and the bookkeeping in it, on the asyncpg connection
        when the handler has a version for that (PostgreSQL), else in a session."""
        if self._driver_handler is not None:
            driver_handler = self._driver_handler
            async with self.database.driver_transaction() as connection:
                yield functools.partial(driver_handler, connection), DriverBookkeeping(connection, self.tables)
        else:
            async with self.database.sessionmaker() as session, session.begin():
                yield functools.partial(self._handler, session), Bookkeeping(session, self.tables)

    async def _signal_lag(self, source: Source, positions: dict[int, int]) -> None:
        """Commit to the bus what the database already holds, at most once per ``bus_commit_interval`` (the
        rest is committed by a later step, busy or idle): monitoring only, so a failure is just logged."""
        if self.group is None:
            return
        for partition, offset in positions.items():
            self._bus_pending[partition] = max(offset, self._bus_pending.get(partition, 0))
        now = time.monotonic()
        if not self._bus_pending or now < self._bus_committed + self.bus_commit_interval:
            return
        pending, self._bus_pending = self._bus_pending, {}
        self._bus_committed = now
        try:
            await source.commit(pending)
        except Exception:
            log.warning("committing offsets to the bus (lag signal) failed", exc_info=True)

    async def _housekeeping(self, source: Source) -> None:
        """Now and then: the lag per partition held, and pruning the processed ids far behind the offsets."""
        now = time.monotonic()
        if self._on_lag is not None and now >= self._lag_due:
            self._lag_due = now + self.lag_interval
            try:
                ends = await source.end_offsets()
            except Exception:
                log.warning("reading the bus's end offsets failed", exc_info=True)
            else:
                for partition, offset in self.positions.items():
                    if partition in ends:
                        self._on_lag(partition, max(0, ends[partition] - offset))
        if now >= self._prune_due:
            self._prune_due = now + self.prune_interval
            await self.prune()

    async def prune(self) -> int:
        """Forget processed ids no redelivery can bring any more (see :meth:`Bookkeeping.prune`)."""
        async with self.database.sessionmaker() as session, session.begin():
            pruned = await Bookkeeping(session, self.tables).prune(
                self.name,
                self.topic,
                keep_offsets=self.keep_offsets,
                before=utcnow() - timedelta(seconds=self.keep_seconds),
            )
        if pruned:
            log.info("consumer %s (%s) forgot %d processed event ids", self.name, self.topic, pruned)
        return pruned

    async def drain(self, *, idle: float = 0.0) -> int:
        """Apply batches until a poll brings nothing within ``idle`` seconds; return the events applied.

        On Kafka give ``idle`` a second or so: a poll without waiting may come back empty while messages
        are still being fetched.
        """
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
                    if self.linger and 0 < self._last_batch < self.max_records and not self._held:
                        await asyncio.sleep(self.linger)
                except Exception:
                    if self._on_error is not None:
                        self._on_error()
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
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # stop() itself was cancelled, not just the consumer
        await self._reset()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()


def stored_positions(consumer: IdempotentConsumer) -> Callable[[], Awaitable[dict[int, int]]]:
    """The offsets ``consumer`` committed with its effects, read fresh each call (for the lag metric)."""

    async def positions() -> dict[int, int]:
        async with consumer.database.sessionmaker() as session:
            return await Bookkeeping(session, consumer.tables).offsets(consumer.name, consumer.topic)

    return positions
