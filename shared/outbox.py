"""The transactional outbox, shared by every service that publishes events (registry, records).

A service writes its events into its own ``outbox`` table in the same transaction as the change they
describe; :class:`OutboxRelay` publishes them to the service's topic and marks them. At-least-once by
construction: rows are marked only after the bus acknowledged them, so a crash between the two publishes
them again, and consumers absorb the repeat by event id. Several relays (replicas, or relay processes of their
own) may run: on PostgreSQL one at a time publishes a shard's outbox (:data:`RELAY_LOCK`), so each municipality's
events reach the topic in the order they were written; the others find nothing to claim there and never wait, and
take over when it stops. Rows are claimed ``FOR UPDATE SKIP LOCKED`` besides, so that a shard move can wait for
the claims in flight.

A relay sleeps until a commit wakes it for the shards it wrote, or ``idle_seconds`` pass (then it looks at
every shard). A commit in the relay's own process wakes it directly; a relay in a process of its own (the
production layout) is woken by ``NOTIFY`` from the writers' :class:`OutboxNotifier`. Passes are paced: one
starts no sooner than ``linger_seconds`` after the last one that published something ended, so under load each
publish carries what committed meanwhile, while the first commit after a quiet spell is published at once. A bus
outage only delays events, which wait in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any, Protocol

from prometheus_client import Counter, Gauge
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    any_,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from shared.bus import OutgoingMessage, Publisher, make_publisher
from shared.db import Database, Databases, utcnow
from shared.events import EVENTS_PER_MESSAGE
from shared.ids import random_uuid_strings
from shared.observability import observe_outbox, stop_on_signals
from shared.periodic import cancel_and_wait
from shared.settings import PublisherSettings

log = logging.getLogger(__name__)

PUBLISHED = Counter("vrs_outbox_published_total", "Outbox events published", ["topic", "shard"])
FAILURES = Counter("vrs_outbox_publish_failures_total", "Failed outbox publish attempts", ["topic", "shard"])
LAST_BATCH = Gauge("vrs_outbox_last_batch_size", "Size of the last published outbox batch", ["topic", "shard"])
# From this many events on, OutboxRepository.add writes them with COPY (PostgreSQL).
COPY_AT_LEAST = 100
# The channel writers NOTIFY after committing outbox rows (PostgreSQL): a relay LISTENs on it in every shard.
NOTIFY_CHANNEL = "outbox"
# The trigger that notified from inside every writing transaction, until records' shard migration 20261125_14
# dropped it: a notifying transaction holds PostgreSQL's notify-queue lock through its commit, WAL flush
# included, so notifying commits ran one at a time (measured here: 510-540 commits/s with it, 2,350-3,200
# without). Kept for the migrations that create and drop it.
NOTIFY_TRIGGER_SQL = (
    f"""
    CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
        RETURN NULL;
    END $$
    """,
    "CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify()",
)
DROP_NOTIFY_TRIGGER_SQL = ("DROP TRIGGER IF EXISTS outbox_notify ON outbox", "DROP FUNCTION IF EXISTS outbox_notify()")


class OutboxEvent(Protocol):
    """What the outbox needs of an event: its id, its partition key, its bytes and when it happened."""

    @property
    def event_id(self) -> Any: ...

    @property
    def key(self) -> str: ...

    @property
    def occurred_at(self) -> datetime: ...

    def to_bytes(self) -> bytes: ...


# The relay claims the oldest unpublished rows, in id order, many times a second; published rows stay a day
# (purge_published). An index on (published_at, id) kept an entry for every version of every row: each row
# marked published left its unpublished entry behind until a vacuum, and the claim, planned as a bitmap scan,
# visited them all (measured in the bench: 8,500 entries and 597 heap pages read to find 23 unpublished rows,
# 2-2.6 ms a claim, growing with the day's rows). A partial index holds the unpublished rows alone, is read
# as an ordinary index scan in id order that stops at the claim's limit (and marks the dead entries it meets,
# so the next scan skips them), and the table is vacuumed after 2 % of it changed instead of PostgreSQL's 20 %.
UNPUBLISHED = text("published_at IS NULL")


def outbox_table(metadata: MetaData) -> Table:
    """The ``outbox`` table, created by the shard migration of every publishing service."""
    return Table(
        "outbox",
        metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("event_id", String(36), nullable=False, unique=True),
        Column("key", String(6), nullable=False),  # the partition key: the municipality code
        Column("payload", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("published_at", DateTime(timezone=True)),
        Index("ix_outbox_unpublished", "id", postgresql_where=UNPUBLISHED, sqlite_where=UNPUBLISHED),
    )


# Room left on each page of the outbox for its rows' publish marks. ``published_at`` is in the partial index's
# predicate, so the mark is never a HOT update; on a full page its new version went to another page and the
# whole row (~480 bytes of a dose event) was written to the WAL again: as much WAL as the insert
# (docs/performance.md). On the same page PostgreSQL logs only the part of the row that changed.
OUTBOX_FILLFACTOR = 50


def migrate_outbox_fillfactor(op: Any, *, room: bool) -> None:
    """For a shard migration of a service with an outbox: :data:`OUTBOX_FILLFACTOR` (``room``), or the default."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"ALTER TABLE outbox SET (fillfactor = {OUTBOX_FILLFACTOR})"
            if room
            else "ALTER TABLE outbox RESET (fillfactor)"
        )


def migrate_unpublished_index(op: Any, *, partial: bool) -> None:
    """For a shard migration of a service with an outbox: ``ix_outbox_unpublished`` as the partial index above
    (``partial``), or back to the earlier ``(published_at, id)``; with it, the outbox's autovacuum setting."""
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    if partial:
        op.create_index(
            "ix_outbox_unpublished", "outbox", ["id"], postgresql_where=UNPUBLISHED, sqlite_where=UNPUBLISHED
        )
    else:
        op.create_index("ix_outbox_unpublished", "outbox", ["published_at", "id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.02)"
            if partial
            else "ALTER TABLE outbox RESET (autovacuum_vacuum_scale_factor)"
        )


def outbox_row(event: OutboxEvent) -> dict[str, Any]:
    """An event as the outbox stores it (for a repository that writes its outbox rows with other rows)."""
    return {
        "event_id": str(event.event_id),
        "key": event.key,
        "payload": event.to_bytes(),
        "created_at": event.occurred_at,
    }


# The events an outbox row holds, in SQL (PostgreSQL): one, or the length of its JSON array (see outbox_rows).
EVENTS_OF_ROW_SQL = (
    "CASE WHEN get_byte(payload, 0) = 91 THEN json_array_length(convert_from(payload, 'UTF8')::json) ELSE 1 END"
)


def outbox_rows(events: Sequence[OutboxEvent], *, per_row: int = EVENTS_PER_MESSAGE) -> list[dict[str, Any]]:
    """Events as outbox rows: an event alone as itself; several of one key as one row holding a JSON array
    of up to ``per_row`` of them, in their order. A batch then costs the outbox, the relay, the bus and its
    consumers one row and one message per key instead of one per event; each event keeps its id."""
    by_key: dict[str, list[OutboxEvent]] = {}
    for event in events:
        by_key.setdefault(event.key, []).append(event)
    rows = []
    for key, group in by_key.items():
        for start in range(0, len(group), per_row):
            chunk = group[start : start + per_row]
            if len(chunk) == 1:
                rows.append(outbox_row(chunk[0]))
                continue
            rows.append(
                {
                    "event_id": random_uuid_strings(1)[0],  # the row's own id: its events keep theirs
                    "key": key,
                    "payload": b"[" + b",".join(e.to_bytes() for e in chunk) + b"]",
                    "created_at": chunk[0].occurred_at,
                }
            )
    return rows


# For the claim's transaction (PostgreSQL): no bitmap scan. A bitmap scan of the partial index (UNPUBLISHED)
# still visits the heap for every dead entry, and never marks them dead for the next scan; the planner picks
# one whenever it guesses few rows to sort (a generic plan, a table without fresh statistics). An index scan
# in id order stops at the claim's limit and marks what it finds dead.
CLAIM_PLAN = text("SET LOCAL enable_bitmapscan = off")


# One relay at a time publishes a database's outbox (PostgreSQL, a transaction-scoped advisory lock; the two-int
# key space, apart from the coupons' one-bigint keys). Rows claimed FOR UPDATE SKIP LOCKED let a second relay take
# the rows after the first one's, and publish them first: a municipality's later events on the topic before its
# earlier ones, exactly when both drain a backlog after Kafka comes back. A second relay now finds nothing to
# claim while the first publishes, and takes over the shard as soon as the first commits or dies.
RELAY_LOCK = (0x56525352, 0)  # "VRSR"


def claim_statement(t: Table, limit: int, *, one_relay: bool = False) -> Any:
    """:meth:`OutboxRepository.claim_unpublished`'s statement (read through the partial index, UNPUBLISHED).
    ``one_relay`` (PostgreSQL): nothing is claimed unless this transaction holds :data:`RELAY_LOCK`."""
    stmt = (
        select(t.c.id, t.c.key, t.c.payload)
        .where(t.c.published_at.is_(None))
        .order_by(t.c.id)
        .limit(limit)
        .with_for_update(of=t, skip_locked=True)
    )
    if one_relay:
        # A scalar subquery: evaluated once, before the scan (a one-time filter), not once a row.
        stmt = stmt.where(select(func.pg_try_advisory_xact_lock(*RELAY_LOCK)).scalar_subquery())
    fences = t.metadata.tables.get("shard_fences")
    if fences is not None:
        # A municipality moving to another shard (shared/shardmove.py): its events move with it and are
        # published there, once. A NOT IN of the (few) fenced codes is a filter on the scan, which keeps its
        # order: an anti join may be planned as a hash join, whose output is sorted, all of it, for the limit.
        stmt = stmt.where(t.c.key.not_in(select(fences.c.municipality_code)))
    return stmt


def claim_and_mark_sql(t: Table, limit: int) -> str:
    """The relay's claim on PostgreSQL as one statement: the rows :func:`claim_statement` reads, locked, marked
    published and returned (to be published before the transaction commits: a failed publish rolls the mark
    back). With :data:`CLAIM_BEGIN` and the commit, a pass is three round trips instead of five. Rows come
    back in no particular order; the caller sorts them by id."""
    claimed = claim_statement(t, limit, one_relay=True).with_only_columns(t.c.id)
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    compiled = claimed.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    return (
        f"WITH claimed AS ({compiled}) UPDATE {t.name} SET published_at = now() FROM claimed "
        f"WHERE {t.name}.id = claimed.id RETURNING {t.name}.id, {t.name}.key, {t.name}.payload"
    )


# The claim's transaction begun with its plan setting (CLAIM_PLAN) in one round trip.
CLAIM_BEGIN = f"BEGIN; {CLAIM_PLAN.text}"


class OutboxRepository:
    def __init__(self, session: AsyncSession, table: Table) -> None:
        self.session = session
        self.table = table

    async def add(self, events: Sequence[OutboxEvent]) -> None:
        """Write ``events`` in one statement, in the caller's transaction (on PostgreSQL a ``COPY`` for many:
        a bulk import announces a coupon per row, and an executemany checks every parameter in Python)."""
        if not events:
            return
        if len(events) >= COPY_AT_LEAST and self.session.get_bind().dialect.name == "postgresql":
            raw: Any = (await (await self.session.connection()).get_raw_connection()).driver_connection
            records = [(str(e.event_id), e.key, e.to_bytes(), e.occurred_at) for e in events]
            columns = ["event_id", "key", "payload", "created_at"]
            await raw.copy_records_to_table(self.table.name, records=records, columns=columns)
            return
        await self.session.execute(insert(self.table), [outbox_row(e) for e in events])

    async def claim_unpublished(self, limit: int) -> list[Any]:
        """The oldest unpublished events, locked; on PostgreSQL nothing while another relay publishes this outbox
        (:data:`RELAY_LOCK`)."""
        postgres = self.session.get_bind().dialect.name == "postgresql"
        if postgres:
            await self.session.execute(CLAIM_PLAN)
        return list((await self.session.execute(claim_statement(self.table, limit, one_relay=postgres))).all())

    async def mark_published(self, ids: Sequence[int], at: datetime | None = None) -> None:
        column = self.table.c.id
        if self.session.get_bind().dialect.name == "postgresql":
            # One array parameter, one prepared statement: ``IN`` of a batch's ids is a statement text of its own
            # per batch size. (The UPDATE itself stayed 10-12 ms per 500 rows under a batch load: writing them.)
            where = column == any_(bindparam("ids", list(ids), type_=postgresql.ARRAY(BigInteger)))
        else:
            where = column.in_(ids)
        await self.session.execute(update(self.table).where(where).values(published_at=at or utcnow()))

    async def purge_published(self, before: datetime) -> int:
        """Drop events published before ``before``: the topic, not the outbox, is the history. (A scan of the
        table, every ten minutes: the only index on ``published_at`` holds the unpublished rows alone.)"""
        t = self.table
        result = await self.session.execute(delete(t).where(t.c.published_at.is_not(None), t.c.published_at < before))
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def backlog(self) -> tuple[int, datetime | None]:
        """(unpublished events, when the oldest of them was written)."""
        t = self.table
        count, oldest = (
            await self.session.execute(select(func.count(), func.min(t.c.created_at)).where(t.c.published_at.is_(None)))
        ).one()
        if oldest is not None and oldest.tzinfo is None:  # SQLite keeps no zone; we write UTC
            oldest = oldest.replace(tzinfo=UTC)
        return int(count), oldest


async def sample_backlog(service: str, databases: Databases, table: Table) -> None:
    """Every shard's backlog and the age of its oldest waiting event, for /metrics at scrape time
    (``build_app(collect_metrics=...)``): true whichever process runs the relay."""
    for name, db in databases.shards.items():
        async with db.sessionmaker() as session:
            count, oldest = await OutboxRepository(session, table).backlog()
        observe_outbox(service, name, backlog=count, oldest=oldest)


class OutboxNotifier:
    """Wakes relays in other processes after this process committed outbox rows: ``NOTIFY`` on the shard,
    outside the writing transaction (see :data:`NOTIFY_TRIGGER_SQL` for why not inside).

    Debounced per shard: while one ``NOTIFY`` is on its way, further wake-ups collapse into one more, sent no
    sooner than ``min_interval`` after the last; under load that is a few notifications a second, whatever the
    commit rate. A lost one (this process died between its commit and the ``NOTIFY``) costs the relay's idle
    look, no event.
    """

    def __init__(self, databases: Databases, *, min_interval: float = 0.01) -> None:
        self._shards = {name: db for name, db in databases.shards.items() if db.engine.dialect.name == "postgresql"}
        self._min_interval = min_interval
        self._again: set[str] = set()
        self._sending: dict[str, asyncio.Task[None]] = {}

    def wake(self, *shards: str) -> None:
        for name in shards or self._shards:
            if name not in self._shards:
                continue  # SQLite: the relay is in this process (the embedded mode), or looks when idle
            if name in self._sending:
                self._again.add(name)
            else:
                self._sending[name] = asyncio.create_task(self._send(name), name=f"outbox-notify-{name}")

    async def _send(self, name: str) -> None:
        try:
            while True:
                self._again.discard(name)
                sent = time.monotonic()
                async with self._shards[name].engine.connect() as conn:
                    conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                    await conn.exec_driver_sql(f"NOTIFY {NOTIFY_CHANNEL}")
                if name not in self._again:
                    return
                await asyncio.sleep(max(0.0, sent + self._min_interval - time.monotonic()))
        except Exception as exc:
            log.warning("outbox NOTIFY on shard %s failed (%s); the relay finds the events when idle", name, exc)
        finally:
            del self._sending[name]

    async def close(self) -> None:
        await cancel_and_wait(*self._sending.values())


class OutboxRelay:
    def __init__(
        self,
        databases: Databases,
        publisher: Publisher,
        table: Table,
        *,
        topic: str,
        batch_size: int,
        idle_seconds: float,
        linger_seconds: float = 0.005,
        retention: timedelta = timedelta(days=1),
    ) -> None:
        self._databases = databases
        self._publisher = publisher
        self._table = table
        self._topic = topic
        self._batch_size = batch_size
        self._claim_sql = claim_and_mark_sql(table, batch_size)
        self._idle = idle_seconds
        self._linger = linger_seconds
        self._retention = retention
        self._next_purge = 0.0
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()

    async def listen(self) -> None:
        """Wake on commits to a PostgreSQL shard's outbox in other processes (``LISTEN``; see :class:`OutboxNotifier`).

        One dedicated asyncpg connection per shard; a lost one is re-opened, and the idle look every
        ``idle_seconds`` covers the gap. SQLite shards are woken in-process only (see :meth:`wake`).
        """
        listeners = [
            asyncio.create_task(self._listen(name, db), name=f"outbox-listen-{name}")
            for name, db in self._databases.shards.items()
            if db.engine.dialect.name == "postgresql"
        ]
        try:
            await asyncio.gather(*listeners)
        finally:
            for task in listeners:
                task.cancel()

    async def _listen(self, name: str, db: Database) -> None:
        import asyncpg  # type: ignore[import-untyped]

        dsn = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(dsn)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, done=lost: done.set())
                await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self.wake(name))
                self.wake(name)  # what was committed while nobody listened
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox LISTEN on shard %s failed (%s); retrying", name, type(exc).__name__)
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close()
            await asyncio.sleep(1.0)

    def wake(self, *shards: str) -> None:
        """Events were committed in ``shards`` (all shards when none are named)."""
        self._dirty.update(shards or self._databases.shards)
        self._wake.set()

    async def publish_pending(self, name: str, db: Database) -> int:
        """Publish one batch of this shard's outbox; the number of events published."""
        if db.engine.dialect.name == "postgresql":
            published = await self.publish_on_connection(db)
        else:
            published = await self.publish_through_session(db)
        if published:
            PUBLISHED.labels(self._topic, name).inc(published)
            LAST_BATCH.labels(self._topic, name).set(published)
        return published

    async def publish_on_connection(self, db: Database) -> int:
        """A pass on PostgreSQL, on the asyncpg connection itself: three round trips. Through a session it cost
        1.7-2.4 ms of this process's CPU (five statements, each built, compiled and run through a greenlet),
        0.35-0.41 ms this way (python -m devtools.bench loops). Below full speed a pass carries a dose or two,
        and the relay was a fifth of records' CPU."""
        async with db.driver_transaction(CLAIM_BEGIN) as conn:
            rows = sorted(await conn.fetch(self._claim_sql), key=itemgetter(0))
            if rows:
                await self._publisher.publish([OutgoingMessage(key=key, value=payload) for _, key, payload in rows])
        return len(rows)

    async def publish_through_session(self, db: Database) -> int:
        """A pass through a session: SQLite's (and on PostgreSQL what :meth:`publish_on_connection` replaced)."""
        async with db.sessionmaker() as session, session.begin():
            outbox = OutboxRepository(session, self._table)
            rows = await outbox.claim_unpublished(self._batch_size)
            if rows:
                await self._publisher.publish([OutgoingMessage(key=row.key, value=row.payload) for row in rows])
                await outbox.mark_published([row.id for row in rows])
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
                await OutboxRepository(session, self._table).purge_published(utcnow() - self._retention)

    async def run(self) -> None:
        listener = asyncio.create_task(self.listen(), name=f"outbox-listen-{self._topic}")
        try:
            await self._run()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _run(self) -> None:
        backoff = 0.5
        due = set(self._databases.shards)
        passed = 0.0  # when the last round of passes that published something ended (monotonic)
        while True:
            if time.monotonic() >= self._next_purge:
                self._next_purge = time.monotonic() + 600
                try:
                    await self.purge()
                except Exception as exc:
                    log.warning("outbox purge failed (%s)", type(exc).__name__)
            busy: set[str] = set()
            published = 0
            for name in sorted(due):
                try:
                    published += (n := await self.publish_pending(name, self._databases.shards[name]))
                    if n == self._batch_size:
                        busy.add(name)
                    backoff = 0.5
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    FAILURES.labels(self._topic, name).inc()
                    log.warning(
                        "outbox relay (%s, shard %s) failed (%s); retrying in %.1fs",
                        self._topic,
                        name,
                        type(exc).__name__,
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    busy.add(name)
            if busy:
                due = busy
                continue
            if published:  # a pass that found nothing (an idle look) paces nothing
                passed = time.monotonic()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._idle)
                await asyncio.sleep(max(0.0, passed + self._linger - time.monotonic()))
            except TimeoutError:
                self._dirty.update(self._databases.shards)
            self._wake.clear()
            due, self._dirty = self._dirty, set()


@contextlib.asynccontextmanager
async def relay_in_background(
    settings: PublisherSettings, databases: Databases, table: Table, *, topic: str
) -> AsyncIterator[OutboxRelay | OutboxNotifier]:
    """What publishes this process's commits: the relay as a task of this process when ``settings.run_relay``,
    else a notifier that wakes the relay processes; stopped on exit.

    Give it to the app as ``app.state.relay``: the request's unit of work then wakes it for the shards it
    committed to.
    """
    if not settings.run_relay:
        notifier = OutboxNotifier(databases)
        try:
            yield notifier
        finally:
            await notifier.close()
        return
    publisher = make_publisher(settings.bus, topic=topic)
    relay = OutboxRelay(
        databases,
        publisher,
        table,
        topic=topic,
        batch_size=settings.relay_batch_size,
        idle_seconds=settings.relay_idle_seconds,
        linger_seconds=settings.relay_linger_seconds,
    )
    task = asyncio.create_task(relay.run(), name=f"outbox-relay-{topic}")
    try:
        yield relay
    finally:
        await cancel_and_wait(task)
        await publisher.close()


async def run_relay_process(settings: PublisherSettings, table: Table, *, topic: str) -> None:
    """``vrs relay <service>``: this process only publishes the outbox, until SIGTERM or SIGINT."""
    databases = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=4)
    stop = stop_on_signals()
    try:
        async with relay_in_background(settings.model_copy(update={"run_relay": True}), databases, table, topic=topic):
            log.info("outbox relay for %s running", topic)
            await stop.wait()
    finally:
        await databases.dispose()
