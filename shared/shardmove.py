"""Moving one municipality's rows to another shard while the service keeps serving (``vrs shards move``).

Each sharded service declares what belongs to a municipality (:class:`MovableTable`: a table and the SQL that
selects the municipality's rows) in a :class:`MoveSpec`; this module does the rest the same way for all:

0. **Pre-copy** (no pause): the target is fenced (nothing there serves the municipality yet; the fence keeps
   its relay and consumers off the copied rows), and each table's rows are copied to it from one snapshot of
   the source (``COPY … TO STDOUT`` binary, spooled to a temporary file, then ``COPY … FROM STDIN``) while the
   source keeps serving. This is the bulk of a move and it grows with the municipality. For the tables declared
   ``captured``, the source first starts recording the keys of the municipality's rows written from then on
   (``shard_captures``, ``shard_move_changes``, statement-level triggers), before the pre-copy's snapshot.
1. **Fence** (source): one transaction takes ``SHARE`` locks on the declared tables — it waits for the write
   transactions in flight, of every municipality, to end (milliseconds) — and inserts the municipality into
   ``shard_fences``. From its commit on, a statement-level trigger on every table with a municipality column
   refuses any write of the municipality's rows in that shard (SQLSTATE ``VR503``, which the services answer
   as ``503`` + ``Retry-After``), and the outbox relay skips its unpublished events. Other municipalities are
   not affected. The relay's claims in flight are waited for (``FOR UPDATE``). A lock that waits makes every
   later writer of its table wait behind it, so it is tried ``LOCK_ATTEMPT_MS`` at a time until the spec's
   ``lock_deadline_seconds`` (a relay publishing to a slow Kafka holds a write open that long), then the move
   stops with a :class:`ShardMoveError` naming the table.
2. **Catch up and flip**: each table is brought up to date on the target in one transaction of its own. A
   captured table carries only the rows of the recorded keys (deleted on the target, copied again from the
   source if still there, their hashes compared): no unchanged row is read, so the pause follows the writes
   made during the pre-copy, not the size. For the other tables (or a move resumed by another run): both
   sides list their rows as (``ctid``, hash of the row), and only the rows that differ — written between the
   pre-copy's snapshot and the fence — are deleted from the target or copied from the source; then the row
   count and checksum (the sum of those hashes) are compared with the source's before the target commits.
   Tables are caught up side by side (under the fence the rows cannot change, so they need no common
   snapshot). The pause so carries the changes of the last seconds plus one listing of the municipality's rows
   on each side (server-side hashing, a few µs a row), not a copy of them. Once every service's copy is
   verified, one main-database transaction per service points the shard map at the target and records the
   move as flipped, and the target's fence is lifted: writes resume on the target. Unpublished outbox rows
   are moved (in their order), so each is relayed once, by the target's relay; published ones stay behind and
   are deleted with the rest.
3. **Clean**: once every process's cached shard map has expired (``SHARD_MAP_TTL_SECONDS`` plus a margin —
   until then a stale process may still read the frozen source rows, and its writes are refused there), the
   source rows are deleted. The source's fence row stays: a stale writer is refused, forgets its cached
   entry and finds the new shard when it retries.

Every step is recorded in ``shard_moves`` (main database) and is safe to repeat, so an interrupted move is
resumed by running the same command again. One run at a time: a run holds an advisory lock per municipality in
each service's main database (:func:`move_lock`), and a second run is refused at once; a killed run's lock goes
with its connection, and a run whose lock connection is lost stops at its next step (:meth:`MoveLock.check`).
The write pause — fence to flip — is stored with the move.
Shard moves need PostgreSQL; the embedded SQLite mode has no fences.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql

from shared.db import SHARD_MAP_TTL_SECONDS, Database, Databases, is_sqlite, upsert, utcnow
from shared.domain.codes import municipality_code_problem

log = logging.getLogger(__name__)

FENCE_SQLSTATE = "VR503"
# Set (transaction-local) by the mover itself, whose copies and deletes the fence must let through.
BYPASS_SQL = "SET LOCAL vrs.shard_move = 'on'"
# How much longer than the cache's lifetime the mover waits before deleting the source rows.
CLEAN_MARGIN_SECONDS = 1.0
# The fence and the start of the recording lock a shard's tables against writes (SHARE). A lock that waits (behind
# a transaction writing one of them: an outbox relay publishing to a slow Kafka holds its claim open for as long
# as it takes) queues every later writer of the table, of every municipality, behind it. So each attempt waits
# at most LOCK_ATTEMPT_MS, lets the queue through for LOCK_PAUSE_SECONDS, and tries again until the move's
# ``lock_deadline_seconds``.
LOCK_ATTEMPT_MS = 150
LOCK_PAUSE_SECONDS = 0.1
LOCK_DEADLINE_SECONDS = 30.0
# The first key of a move's advisory lock (the municipality code is the second): "VRSM", apart from any other
# advisory lock of the main databases.
MOVE_LOCK_CLASS = 0x5652534D


def shard_fences_table(metadata: MetaData) -> Table:
    """Municipalities whose rows this shard must not change: moving in or out (or moved away)."""
    return Table(
        "shard_fences",
        metadata,
        Column("municipality_code", String(6), primary_key=True),
        Column("moving_to", String(64), nullable=False),
        Column("fenced_at", DateTime(timezone=True), nullable=False),
    )


def shard_moves_table(metadata: MetaData) -> Table:
    """One row per municipality moved (the last move): where from, where to, how far, what it cost."""
    return Table(
        "shard_moves",
        metadata,
        Column("municipality_code", String(6), primary_key=True),
        Column("from_shard", String(64), nullable=False),
        Column("to_shard", String(64), nullable=False),
        Column("state", String(16), nullable=False),  # fencing, fenced, flipped, done
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("fenced_at", DateTime(timezone=True)),
        Column("flipped_at", DateTime(timezone=True)),
        Column("finished_at", DateTime(timezone=True)),
        Column("pause_seconds", Float),  # fence committed → flip committed
        Column("rows", JSON),  # table → rows moved
    )


FENCE_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION shard_fence_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    fenced text;
BEGIN
    -- The common case costs one look at an empty table.
    IF NOT EXISTS (SELECT 1 FROM shard_fences) OR current_setting('vrs.shard_move', true) = 'on' THEN
        RETURN NULL;
    END IF;
    EXECUTE format(
        'SELECT f.municipality_code FROM changed c JOIN shard_fences f ON f.municipality_code = c.%I LIMIT 1',
        TG_ARGV[0]
    ) INTO fenced;
    IF fenced IS NOT NULL THEN
        RAISE EXCEPTION 'municipality % is moving to another shard; retry shortly', fenced
            USING ERRCODE = '{FENCE_SQLSTATE}', DETAIL = fenced;
    END IF;
    RETURN NULL;
END $$
"""


def fence_trigger_sql(tables: Sequence[tuple[str, str, Sequence[str]]]) -> list[str]:
    """DDL for a migration: the check function and, per (table, municipality column, events), its triggers."""
    statements = [FENCE_FUNCTION_SQL]
    for table, column, events in tables:
        for op in events:
            transition = "OLD" if op == "DELETE" else "NEW"
            statements.append(
                f"CREATE TRIGGER shard_fence_{op.lower()} AFTER {op} ON {table} "
                f"REFERENCING {transition} TABLE AS changed FOR EACH STATEMENT "
                f"EXECUTE FUNCTION shard_fence_check('{column}')"
            )
    return statements


def drop_fence_trigger_sql(tables: Sequence[tuple[str, str, Sequence[str]]]) -> list[str]:
    drops = [f"DROP TRIGGER IF EXISTS shard_fence_{op.lower()} ON {t}" for t, _, events in tables for op in events]
    return [*drops, "DROP FUNCTION IF EXISTS shard_fence_check()"]


def shard_captures_table(metadata: MetaData) -> Table:
    """Municipalities whose changes this (source) shard records while they are pre-copied elsewhere."""
    return Table(
        "shard_captures",
        metadata,
        Column("municipality_code", String(6), primary_key=True),
        Column("started_at", DateTime(timezone=True), nullable=False),
    )


def shard_move_changes_table(metadata: MetaData) -> Table:
    """The keys of the rows a captured municipality's writes touched since its capture began (repeats allowed)."""
    return Table(
        "shard_move_changes",
        metadata,
        Column("municipality_code", String(6), nullable=False),
        Column("table_name", String(63), nullable=False),
        Column("row_key", postgresql.ARRAY(Text()).with_variant(JSON(), "sqlite"), nullable=False),
        Index("ix_shard_move_changes", "municipality_code", "table_name"),
    )


CAPTURE_FUNCTION_SQL = """
CREATE OR REPLACE FUNCTION shard_move_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    key text;
BEGIN
    -- The common case costs one look at an empty table; the mover's own writes are not changes to carry.
    IF NOT EXISTS (SELECT 1 FROM shard_captures) OR current_setting('vrs.shard_move', true) = 'on' THEN
        RETURN NULL;
    END IF;
    -- TG_ARGV: the municipality column, then the columns of the row's key.
    SELECT string_agg(format('c.%I::text', a), ', ') INTO key FROM unnest(TG_ARGV[1:TG_NARGS - 1]) AS a;
    EXECUTE format(
        'INSERT INTO shard_move_changes (municipality_code, table_name, row_key) '
        'SELECT DISTINCT c.%1$I, %2$L, ARRAY[%3$s] FROM changed c '
        'JOIN shard_captures s ON s.municipality_code = c.%1$I',
        TG_ARGV[0], TG_TABLE_NAME, key
    );
    IF TG_OP = 'UPDATE' THEN  -- a key changed by an update: the old one is gone
        EXECUTE format(
            'INSERT INTO shard_move_changes (municipality_code, table_name, row_key) '
            'SELECT DISTINCT c.%1$I, %2$L, ARRAY[%3$s] FROM before c '
            'JOIN shard_captures s ON s.municipality_code = c.%1$I',
            TG_ARGV[0], TG_TABLE_NAME, key
        );
    END IF;
    RETURN NULL;
END $$
"""


def capture_trigger_sql(tables: Sequence[tuple[str, str, Sequence[str]]]) -> list[str]:
    """DDL for a migration: the capture function and, per (table, municipality column, key columns), its
    triggers on every write (statement-level, like the fence's)."""
    statements = [CAPTURE_FUNCTION_SQL]
    for table, column, key in tables:
        args = ", ".join(f"'{name}'" for name in (column, *key))
        for op, transitions in (
            ("INSERT", "NEW TABLE AS changed"),
            ("UPDATE", "OLD TABLE AS before NEW TABLE AS changed"),
            ("DELETE", "OLD TABLE AS changed"),
        ):
            statements.append(
                f"CREATE TRIGGER shard_capture_{op.lower()} AFTER {op} ON {table} REFERENCING {transitions} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION shard_move_capture({args})"
            )
    return statements


def drop_capture_trigger_sql(tables: Sequence[tuple[str, str, Sequence[str]]]) -> list[str]:
    drops = [
        f"DROP TRIGGER IF EXISTS shard_capture_{op} ON {t}"
        for t, _, _ in tables
        for op in ("insert", "update", "delete")
    ]
    return [*drops, "DROP FUNCTION IF EXISTS shard_move_capture()"]


def fenced_municipality(exc: BaseException) -> str | None:
    """The municipality a write was refused for because it is moving, if that is what ``exc`` is."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "sqlstate", None) == FENCE_SQLSTATE or getattr(e, "pgcode", None) == FENCE_SQLSTATE:
            detail = getattr(e, "detail", None)
            return str(detail) if detail else ""
        todo += [getattr(e, "orig", None), e.__cause__, e.__context__]
    return None


@dataclass(frozen=True)
class MovableTable:
    """A shard table holding a municipality's rows. ``where`` selects them (``$1`` is the code); ``copy_where``
    narrows what is copied (the rest is only deleted); ``skip`` names generated columns the target fills."""

    table: Table
    where: str
    copy_where: str | None = None
    skip: tuple[str, ...] = ()
    order_by: str | None = None
    found_through: str | None = None  # the table ``where`` finds the rows through: copied first, deleted last
    # Columns that identify a row on both shards, when the primary key is a generated ``skip`` id.
    key: tuple[str, ...] = ()
    # The shard's capture triggers record the keys of this table's changed rows (``capture_trigger_sql``): under
    # the fence only they are carried, with no scan of the municipality's rows.
    captured: bool = False

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def columns(self) -> list[str]:
        return [c.name for c in self.table.columns if c.name not in self.skip]

    @property
    def selection(self) -> str:
        return self.copy_where or self.where


@dataclass
class MoveSpec:
    """What one service moves: its databases, its tables (in copy order; deleted in reverse), its bookkeeping.

    ``before_fence`` runs before this service's fence (records waits there for its consumers to catch up).
    """

    service: str
    databases: Databases
    tables: Sequence[MovableTable]
    moves: Table
    assignments: Table
    outbox: str | None = "outbox"
    before_fence: Callable[[], Awaitable[None]] | None = None
    rows: dict[str, int] = field(default_factory=dict)
    # How long the fence (or the start of the recording) keeps trying to lock a shard's tables (see LOCK_ATTEMPT_MS).
    lock_deadline_seconds: float = LOCK_DEADLINE_SECONDS


class ShardMoveError(RuntimeError):
    pass


@asynccontextmanager
async def _transaction(db: Database, *, isolation: str = "read_committed") -> AsyncIterator[Any]:
    """An asyncpg connection inside one transaction (SQLAlchemy's own transaction handling off)."""
    async with db.engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        raw: Any = (await conn.get_raw_connection()).driver_connection
        async with raw.transaction(isolation=isolation):
            yield raw


@dataclass
class MoveLock:
    """The locks a run holds (:func:`move_lock`): one connection per service's main database."""

    code: str
    held: list[tuple[str, Any]] = field(default_factory=list)  # (service, connection)

    async def check(self, before: str) -> None:
        """Stop the run, before the step named ``before``, if any of its locks is gone with its connection (a
        database restart, a network cut, an operator's ``pg_terminate_backend``): a second run could have
        started meanwhile, and two runs side by side are what the lock exists to prevent. Each step up to here
        is recorded, so running the move again resumes it."""
        for service, conn in self.held:
            lost = ShardMoveError(
                f"{service}: the lock on moving {self.code} was lost with its database connection; stopped before "
                f"{before} — run the move again to resume it"
            )
            try:
                held = await conn.scalar(_HOLDS_MOVE_LOCK, {"c": MOVE_LOCK_CLASS, "k": int(self.code)})
            except Exception as e:
                raise lost from e
            if not held:
                raise lost


# Whether this session holds the move lock of a municipality (a two-key advisory lock: classid, objid, objsubid 2).
_HOLDS_MOVE_LOCK = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
    "AND classid = :c AND objid = :k AND objsubid = 2)"
)


@asynccontextmanager
async def move_lock(specs: Sequence[MoveSpec], code: str) -> AsyncIterator[MoveLock]:
    """Hold, for a whole run, every service's lock on moving ``code``: a session-level advisory lock in the main
    database where the service records its moves, on a connection kept for the run.

    A second run for the municipality stops at once instead of working beside the first: the two would copy
    ``dose_history`` (no key on the target) twice, both checksums passing, and one's abort could delete rows the
    other verified. A killed run's lock ends with its connection, so running the move again resumes it; a run
    whose connection is lost while it goes on stops at its next step (:meth:`MoveLock.check`)."""
    problem = municipality_code_problem(code)
    if problem is not None:
        raise ShardMoveError(f"{code!r} is not a municipality code: {problem}")
    lock = MoveLock(code)
    async with AsyncExitStack() as held:
        for spec in specs:
            if is_sqlite(spec.databases.main.url):
                raise ShardMoveError("shard moves need PostgreSQL (the embedded SQLite mode has no fences)")
            conn = await held.enter_async_context(spec.databases.main.engine.connect())
            # Autocommit: the connection waits idle for the run, not idle in a transaction (which a server's
            # idle_in_transaction_session_timeout would end, lock and all).
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            key = {"c": MOVE_LOCK_CLASS, "k": int(code)}
            if not await conn.scalar(text("SELECT pg_try_advisory_lock(:c, :k)"), key):
                raise ShardMoveError(
                    f"{spec.service}: a move of {code} is already running (another `vrs shards move` holds its "
                    "lock); let it end, or stop it, then run the move again to resume it"
                )
            held.push_async_callback(_unlock, conn, key)
            lock.held.append((spec.service, conn))
        yield lock


async def _unlock(conn: Any, key: dict[str, int]) -> None:
    try:
        await conn.execute(text("SELECT pg_advisory_unlock(:c, :k)"), key)
    except Exception:
        # The connection is gone (and the lock with it): it must not go back to the pool.
        log.warning("shard move lock of %s: its connection was lost before the move ended", key["k"], exc_info=True)
        await conn.invalidate()


async def _read_move(spec: MoveSpec, code: str) -> dict[str, Any] | None:
    async with spec.databases.main.sessionmaker() as session:
        row = (await session.execute(select(spec.moves).where(spec.moves.c.municipality_code == code))).first()
    return None if row is None else dict(row._mapping)


async def _set_move(spec: MoveSpec, code: str, **values: Any) -> None:
    async with spec.databases.main.sessionmaker() as session, session.begin():
        await session.execute(update(spec.moves).where(spec.moves.c.municipality_code == code).values(**values))


async def plan(spec: MoveSpec, code: str, to: str) -> dict[str, Any] | None:
    """Start (or find the unfinished) move of ``code`` to ``to``; None when it is already there."""
    if is_sqlite(spec.databases.main.url):
        raise ShardMoveError("shard moves need PostgreSQL (the embedded SQLite mode has no fences)")
    if to not in spec.databases.shards:
        raise ShardMoveError(
            f"{spec.service}: no shard named {to!r} (configured: {', '.join(sorted(spec.databases.shards))})"
        )
    move = await _read_move(spec, code)
    if move is not None and move["state"] != "done":
        if move["to_shard"] != to:
            raise ShardMoveError(
                f"{spec.service}: municipality {code} is being moved to {move['to_shard']}; "
                "run that move to its end first"
            )
        return move
    current = (await spec.databases.current_shards([code]))[code]
    if current == to:
        return None
    now = utcnow()
    row = {
        "municipality_code": code,
        "from_shard": current,
        "to_shard": to,
        "state": "fencing",
        "started_at": now,
        "fenced_at": None,
        "flipped_at": None,
        "finished_at": None,
        "pause_seconds": None,
        "rows": None,
    }
    async with spec.databases.main.sessionmaker() as session, session.begin():
        stmt = upsert(session, spec.moves).values(row)
        await session.execute(stmt.on_conflict_do_update(index_elements=["municipality_code"], set_=row))
    return row


async def _lock_for_share(spec: MoveSpec, raw: Any, shard: str) -> None:
    """``SHARE`` locks on the spec's tables in the transaction of ``raw``: once they are held no write of them (any
    municipality) is in flight. Short attempts (a savepoint each) until the spec's deadline, so that the writers
    queued behind a waiting attempt wait a fraction of a second, not until a long transaction ends."""
    deadline = time.monotonic() + spec.lock_deadline_seconds
    while True:
        name = ""
        try:
            async with raw.transaction():
                await raw.execute(f"SET LOCAL lock_timeout = '{LOCK_ATTEMPT_MS}ms'")
                for name in (t.name for t in spec.tables):  # one by one: the one that waited is named below
                    await raw.execute(f"LOCK TABLE {name} IN SHARE MODE")
            return
        except asyncpg.exceptions.LockNotAvailableError:
            if time.monotonic() + LOCK_PAUSE_SECONDS >= deadline:
                raise ShardMoveError(
                    f"{spec.service}: could not lock {name} on {shard} within {spec.lock_deadline_seconds:g}s: a "
                    "transaction writing it has been running all that time (an outbox relay waiting on a slow Kafka "
                    "holds one open); nothing was switched — run the move again, it resumes"
                ) from None
            await asyncio.sleep(LOCK_PAUSE_SECONDS)


async def _fence_shard(spec: MoveSpec, shard: str, code: str, to: str) -> None:
    async with _transaction(spec.databases.shards[shard]) as raw:
        # Waits for the writes in flight (any municipality): after the commit every new one sees the fence.
        await _lock_for_share(spec, raw, shard)
        await raw.execute(
            "INSERT INTO shard_fences (municipality_code, moving_to, fenced_at) VALUES ($1, $2, now()) "
            "ON CONFLICT (municipality_code) DO UPDATE SET moving_to = EXCLUDED.moving_to, fenced_at = now()",
            code,
            to,
        )


async def fence(spec: MoveSpec, move: dict[str, Any]) -> None:
    code, source, target = move["municipality_code"], move["from_shard"], move["to_shard"]
    if move["state"] != "fencing":
        return
    if spec.before_fence is not None:
        await spec.before_fence()
    for name in (source, target):
        await _fence_shard(spec, name, code, target)
    if spec.outbox is not None:
        # A relay that claimed some of these events before the fence publishes them; wait for it to finish.
        async with _transaction(spec.databases.shards[source]) as raw:
            await raw.execute(f"SELECT 1 FROM {spec.outbox} WHERE key = $1 AND published_at IS NULL FOR UPDATE", code)
    move["state"], move["fenced_at"] = "fenced", utcnow()
    await _set_move(spec, code, state="fenced", fenced_at=move["fenced_at"])
    log.info("%s: %s fenced on %s and %s", spec.service, code, source, target)


def _row_sql(table: MovableTable, alias: str = "") -> str:
    """A row's text for hashing; binary columns by their md5: an outbox row of a bulk import carries a
    thousand events, and its hex text would cost more to hash than the rest of the move."""
    binary = {c.name for c in table.table.columns if isinstance(c.type, LargeBinary)}
    values = [f'md5({alias}"{c}")' if c in binary else f'{alias}"{c}"' for c in table.columns]
    return f"ROW({', '.join(values)})::text"


def _checksum_sql(table: MovableTable) -> str:
    return (
        f"SELECT count(*), coalesce(sum(hashtextextended({_row_sql(table)}, 0)::numeric), 0)::text "
        f"FROM {table.name} WHERE {table.selection}"
    )


def _waves(spec: MoveSpec) -> list[list[MovableTable]]:
    """Tables in the order they can be copied side by side: those found through another wait for it."""
    return [
        [t for t in spec.tables if t.found_through is None],
        [t for t in spec.tables if t.found_through is not None],
    ]


async def _write_precopied(
    spec: MoveSpec, t: MovableTable, code: str, target: str, path: str, expected: tuple[Any, ...]
) -> int:
    """One pre-copied table onto the fenced target, its row count and checksum compared before it commits."""
    async with _transaction(spec.databases.shards[target]) as raw:
        await raw.execute(BYPASS_SQL)
        await raw.execute("SET LOCAL TimeZone = 'UTC'")
        await raw.execute(f"DELETE FROM {t.name} WHERE {t.where}", code)  # left by an interrupted attempt
        await raw.copy_to_table(t.name, source=path, columns=t.columns, format="binary")
        found = tuple(await raw.fetchrow(_checksum_sql(t), code))
        if found != expected:
            raise ShardMoveError(
                f"{spec.service}: {t.name} of {code} differs after the copy "
                f"({found[0]} rows on the target, {expected[0]} on the source); nothing was switched"
            )
    return int(expected[0])


async def precopy(spec: MoveSpec, move: dict[str, Any]) -> dict[str, int] | None:
    """Before the fence: fence the target (nothing there serves the municipality yet; its relay and consumers
    must leave the copied rows alone) and copy the municipality's rows onto it while the source keeps serving.
    Under the fence :func:`copy` then only carries what changed since, so the write pause follows the changes
    made during the copy, not the municipality's size. Rows per table (None: already past this step)."""
    code, source, target = move["municipality_code"], move["from_shard"], move["to_shard"]
    if move["state"] != "fencing":
        return None
    await _fence_shard(spec, target, code, target)
    captured = any(t.captured for t in spec.tables)
    if captured:
        await _start_capture(spec, source, code)
    started, rows, expected = time.monotonic(), dict[str, int](), dict[str, tuple[Any, ...]]()
    with tempfile.TemporaryDirectory(prefix="vrs-shard-precopy-") as spool:
        # One snapshot for every table: a table found through another (records' keys through its doses) must
        # match it on the target as it did on the source.
        async with _transaction(spec.databases.shards[source], isolation="repeatable_read") as raw:
            await raw.execute("SET LOCAL TimeZone = 'UTC'")
            # What this snapshot saw is what the target gets; under the fence only what it did not see moves.
            snapshot = await raw.fetchrow(
                "SELECT pg_snapshot_xmax(s)::text, array(SELECT x::text FROM pg_snapshot_xip(s) AS x) "
                "FROM pg_current_snapshot() AS s"
            )
            since = (int(snapshot[0]), [int(x) for x in snapshot[1]])
            for t in spec.tables:
                cols = ", ".join(f'"{c}"' for c in t.columns)
                order = f" ORDER BY {t.order_by}" if t.order_by else ""
                query = f"SELECT {cols} FROM {t.name} WHERE {t.selection}{order}"
                await raw.copy_from_query(query, code, output=f"{spool}/{t.name}", format="binary")
                expected[t.name] = tuple(await raw.fetchrow(_checksum_sql(t), code))
        for wave in _waves(spec):
            counts = await asyncio.gather(
                *(_write_precopied(spec, t, code, target, f"{spool}/{t.name}", expected[t.name]) for t in wave)
            )
            rows |= {t.name: n for t, n in zip(wave, counts, strict=True)}
    # Kept with the move in memory only: a move resumed by another run has no pre-copy to build on, and its
    # catch-up compares every row (see _catch_up_table).
    move["since"] = {t.name: since for t in spec.tables}
    move["precopied"] = dict(rows) if captured else {}
    log.info("%s: %s pre-copied to %s in %.2fs: %s", spec.service, code, target, time.monotonic() - started, rows)
    return rows


async def _start_capture(spec: MoveSpec, shard: str, code: str) -> None:
    """From this commit on, the source records the key of every row of ``code`` written (by anyone but the
    mover). Like the fence it waits for the writes in flight: any transaction the pre-copy's snapshot (taken
    after this) does not see wrote after the capture began, so its rows are recorded."""
    async with _transaction(spec.databases.shards[shard]) as raw:
        await _lock_for_share(spec, raw, shard)
        await raw.execute("DELETE FROM shard_move_changes WHERE municipality_code = $1", code)  # an earlier attempt's
        await raw.execute(
            "INSERT INTO shard_captures (municipality_code, started_at) VALUES ($1, now()) "
            "ON CONFLICT (municipality_code) DO UPDATE SET started_at = now()",
            code,
        )


async def _stop_capture(spec: MoveSpec, raw: Any, code: str) -> None:
    if any(t.captured for t in spec.tables):
        await raw.execute("DELETE FROM shard_captures WHERE municipality_code = $1", code)
        await raw.execute("DELETE FROM shard_move_changes WHERE municipality_code = $1", code)


def _renumbered(sql: str, n: int) -> str:
    """A ``where`` of a :class:`MovableTable` (its one parameter, the code, is ``$1``) with the code as ``$n``."""
    return re.sub(r"\$1\b", f"${n}", sql)


async def _copy_rows(t: MovableTable, src: Any, dst: Any, rows: str, code: str, path: str) -> None:
    """Copy the source's rows ``SELECT … FROM {rows}`` (``t`` aliased ``t``; ``$1`` the code) to the target,
    through a binary spool file at ``path``, in the table's copy order."""
    cols = ", ".join(f't."{c}"' for c in t.columns)
    order = f" ORDER BY {t.order_by}" if t.order_by else ""
    await src.copy_from_query(f"SELECT {cols} FROM {rows}{order}", code, output=path, format="binary")
    await dst.copy_to_table(t.name, source=path, columns=t.columns, format="binary")


async def _replace_captured(
    t: MovableTable, code: str, src: Any, dst: Any, precopied: int, path: str
) -> tuple[int, int]:
    """After a pre-copy of a captured table, under the fence: the rows whose keys the source recorded since the
    capture began are deleted from the target and copied again from the source (those still there, in the
    selection), and their hashes compared. Nothing else is read: the work follows the changes, not the size.
    Returns (the table's rows now, the keys carried)."""
    keys = _key_columns(t)
    assert keys is not None
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    captured = await src.fetch(
        "SELECT DISTINCT row_key FROM shard_move_changes WHERE municipality_code = $1 AND table_name = $2",
        code,
        t.name,
    )
    if not captured:
        return precopied, 0
    recorded = ", ".join(f"row_key[{i + 1}]::{c.type.compile(dialect=dialect)} AS k{i}" for i, c in enumerate(keys))
    changes = (
        f"(SELECT DISTINCT {recorded} FROM shard_move_changes "
        f"WHERE municipality_code = $1 AND table_name = '{t.name}') AS k"
    )
    match = " AND ".join(f't."{c.name}" = k.k{i}' for i, c in enumerate(keys))
    row = _row_sql(t, alias="t.")
    where = f"{match} AND ({t.selection})"
    listed = await src.fetch(f"SELECT hashtextextended({row}, 0) FROM {t.name} AS t, {changes} WHERE {where}", code)
    join, arrays = _by_key(keys, [tuple(r["row_key"]) for r in captured])
    status = await dst.execute(
        f"DELETE FROM {t.name} AS t USING {join} AND {_renumbered(t.where, len(arrays) + 1)}", *arrays, code
    )
    deleted = int(status.split()[-1])
    if listed:
        await _copy_rows(t, src, dst, f"{t.name} AS t, {changes} WHERE {where}", code, path)
    arrived = await dst.fetchrow(
        f"SELECT count(*), coalesce(sum(hashtextextended({row}, 0)::numeric), 0)::text FROM {t.name} AS t, {join} "
        f"AND {_renumbered(t.where, len(arrays) + 1)}",
        *arrays,
        code,
    )
    if tuple(arrived) != (len(listed), str(sum(h for (h,) in listed))):
        raise ShardMoveError(f"{t.name} of {code}: the rows changed during the move differ after the copy")
    return precopied - deleted + len(listed), len(captured)


def _changed_since(snapshot: tuple[int, list[int]]) -> str:
    """Rows whose version the pre-copy's snapshot (its xmax and in-progress ids, 64-bit) did not see: written by
    a transaction from xmax on, or by one still running then. ``age`` compares 32-bit ids as PostgreSQL does
    (frozen rows are the oldest) without a text conversion per row. A row written in a subtransaction of a
    transaction running at the snapshot has an id of its own, not listed: the services use no savepoints, and a
    row so inserted would still show in the row counts (the full comparison then runs)."""
    xmax, running = snapshot
    after = f"age(xmin) <= age('{xmax % (1 << 32)}'::xid)"
    if running:
        after += f" OR xmin = ANY('{{{','.join(str(r % (1 << 32)) for r in running)}}}'::xid[])"
    return f"({after})"


def _key_columns(t: MovableTable) -> list[Any] | None:
    """The columns naming a row on both shards: ``key``, else the primary key if the target keeps it."""
    keys = [t.table.columns[name] for name in t.key] or list(t.table.primary_key.columns)
    return keys if keys and all(c.name in t.columns for c in keys) else None


def _by_key(keys: list[Any], listed: Sequence[Any]) -> tuple[str, list[list[str | None]]]:
    """``unnest(...) AS k(...)`` over the listed rows' keys and the condition matching table ``t`` to it;
    the key values travel as text arrays and are cast back to the column types."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    arrays = [[None if r[i] is None else str(r[i]) for r in listed] for i in range(len(keys))]
    unnest = ", ".join(f"${i + 1}::text[]" for i in range(len(keys)))
    names = ", ".join(f"k{i}" for i in range(len(keys)))
    match = " AND ".join(f't."{c.name}" = k.k{i}::{c.type.compile(dialect=dialect)}' for i, c in enumerate(keys))
    return f"unnest({unnest}) AS k({names}) WHERE {match}", arrays


async def _replace_changed(
    t: MovableTable, code: str, src: Any, dst: Any, since: tuple[int, list[int]], path: str
) -> int | None:
    """After a pre-copy, under the fence: replace on the target only the rows written on the source since the
    pre-copy's snapshot (found by ``xmin``, matched by primary key) and verify them: their hashes, and both
    sides' row counts. The rows replaced, or None when the counts differ (a row deleted meanwhile): then the
    caller compares every row. One counting scan on each side, side by side; no unchanged row is hashed or sent.
    """
    keys = _key_columns(t)
    assert keys is not None
    row = _row_sql(t, alias="t.")
    key_list = ", ".join(f'"{c.name}"' for c in keys)
    changed = _changed_since(since)
    (total, fresh), held = await asyncio.gather(
        src.fetchrow(f"SELECT count(*), count(*) FILTER (WHERE {changed}) FROM {t.name} WHERE {t.selection}", code),
        dst.fetchval(f"SELECT count(*) FROM {t.name} WHERE {t.selection}", code),
    )
    if not fresh:
        return 0 if total == held else None
    where = f"{t.selection} AND {changed}"
    listed = await src.fetch(f"SELECT {key_list}, hashtextextended({row}, 0) FROM {t.name} AS t WHERE {where}", code)
    join, arrays = _by_key(keys, listed)
    await dst.execute(f"DELETE FROM {t.name} AS t USING {join}", *arrays)
    await _copy_rows(t, src, dst, f"{t.name} AS t WHERE {where}", code, path)
    arrived = await dst.fetchval(
        f"SELECT coalesce(sum(hashtextextended({row}, 0)::numeric), 0)::text FROM {t.name} AS t, {join}", *arrays
    )
    if arrived != str(sum(h for *_, h in listed)):
        raise ShardMoveError(f"{t.name} of {code}: the rows changed during the move differ after the copy")
    if await dst.fetchval(f"SELECT count(*) FROM {t.name} WHERE {t.selection}", code) != total:
        return None
    return len(listed)


async def _catch_up_table(
    spec: MoveSpec,
    t: MovableTable,
    code: str,
    source: str,
    target: str,
    spool: str,
    since: tuple[int, list[int]] | None,
    precopied: int | None = None,
) -> int:
    """One fenced table: bring the target's rows to the source's and verify them, in one target transaction.

    After a pre-copy (``since``: its snapshot) a table with a primary key replaces only the rows
    written since (:func:`_replace_changed`). Otherwise, or when a row was deleted meanwhile:

    Both sides list their rows as (ctid, hash of the row); the rows whose content the other side lacks are
    deleted from the target or copied from the source by ctid (both stay put: under the fence nobody but the
    mover writes them). Rows are matched by content, not key, so tables whose ids the target generates
    (``skip``) catch up the same way. Nothing here needs a common snapshot with the other tables: under the
    fence the municipality's rows do not change (the relays leave its unpublished events alone).
    """
    path = f"{spool}/{t.name}"
    started = time.monotonic()
    listing = f"SELECT ctid::text, hashtextextended({_row_sql(t)}, 0) FROM {t.name} WHERE {t.selection}"
    async with (
        _transaction(spec.databases.shards[source], isolation="repeatable_read") as src,
        _transaction(spec.databases.shards[target]) as dst,
    ):
        await dst.execute(BYPASS_SQL)
        for raw in (src, dst):
            await raw.execute("SET LOCAL TimeZone = 'UTC'")  # a timestamptz's text (so its hash) depends on it
        if t.captured and precopied is not None and _key_columns(t) is not None:
            rows, carried = await _replace_captured(t, code, src, dst, precopied, path)
            log.info(
                "%s: %s of %s: %d rows, %d keys written since the pre-copy carried under the fence in %.2fs",
                spec.service,
                t.name,
                code,
                rows,
                carried,
                time.monotonic() - started,
            )
            return rows
        if since is not None and _key_columns(t) is not None:
            replaced = await _replace_changed(t, code, src, dst, since, path)
            if replaced is not None:
                rows = int(await src.fetchval(f"SELECT count(*) FROM {t.name} WHERE {t.selection}", code))
                log.info(
                    "%s: %s of %s: %d rows, %d written since the pre-copy replaced under the fence in %.2fs",
                    spec.service,
                    t.name,
                    code,
                    rows,
                    replaced,
                    time.monotonic() - started,
                )
                return rows
        theirs, ours = await src.fetch(listing, code), await dst.fetch(listing, code)
        wanted: dict[int, list[str]] = {}
        for ctid, h in theirs:
            wanted.setdefault(h, []).append(ctid)
        held: dict[int, list[str]] = {}
        for ctid, h in ours:
            held.setdefault(h, []).append(ctid)
        stale = [c for h, ctids in held.items() for c in ctids[len(wanted.get(h, ())) :]]
        missing = [c for h, ctids in wanted.items() for c in ctids[len(held.get(h, ())) :]]
        if stale:
            await dst.execute(f"DELETE FROM {t.name} WHERE ctid = ANY($1::text[]::tid[])", stale)
        if missing:
            cols = ", ".join(f'"{c}"' for c in t.columns)
            order = f" ORDER BY {t.order_by}" if t.order_by else ""
            query = f"SELECT {cols} FROM {t.name} WHERE ctid = ANY($1::text[]::tid[]){order}"
            await src.copy_from_query(query, missing, output=path, format="binary")
            await dst.copy_to_table(t.name, source=path, columns=t.columns, format="binary")
        expected = (len(theirs), str(sum(h for _, h in theirs)))
        found = tuple(await dst.fetchrow(_checksum_sql(t), code))
        if found != expected:
            raise ShardMoveError(
                f"{spec.service}: {t.name} of {code} differs after the copy "
                f"({found[0]} rows on {target}, {expected[0]} on {source}); nothing was switched"
            )
    log.info(
        "%s: %s of %s: %d rows, %d copied and %d replaced under the fence in %.2fs",
        spec.service,
        t.name,
        code,
        expected[0],
        len(missing),
        len(stale),
        time.monotonic() - started,
    )
    return int(expected[0])


async def copy(spec: MoveSpec, move: dict[str, Any]) -> dict[str, int] | None:
    """Bring the target's copy of a fenced municipality up to date, verified; the rows per table (None: not
    fenced). After :func:`precopy` only what changed since moves here; without it (a move interrupted before
    its pre-copy ended), everything.

    Tables are caught up side by side, one transaction (and connection) each; a table whose rows are found
    through another (``found_through``) waits for that one.
    """
    code, source, target = move["municipality_code"], move["from_shard"], move["to_shard"]
    if move["state"] != "fenced":
        return None
    with tempfile.TemporaryDirectory(prefix="vrs-shard-move-") as spool:
        rows: dict[str, int] = {}
        for wave in _waves(spec):
            since, precopied = move.get("since", {}), move.get("precopied", {})
            counts = await asyncio.gather(
                *(
                    _catch_up_table(spec, t, code, source, target, spool, since.get(t.name), precopied.get(t.name))
                    for t in wave
                )
            )
            rows |= {t.name: n for t, n in zip(wave, counts, strict=True)}
    return {t.name: rows[t.name] for t in spec.tables}


async def flip(spec: MoveSpec, move: dict[str, Any], rows: dict[str, int] | None) -> None:
    """Point the shard map at the copied rows and lift the target's fence: the municipality's writes resume."""
    code, target = move["municipality_code"], move["to_shard"]
    if move["state"] == "fenced":
        assert rows is not None, "flip() after copy()"
        flipped = utcnow()
        pause = (flipped - move["fenced_at"]).total_seconds()
        async with spec.databases.main.sessionmaker() as session, session.begin():
            a = spec.assignments
            await session.execute(
                update(a).where(a.c.municipality_code == code).values(shard=target, assigned_at=flipped)
            )
            await session.execute(
                update(spec.moves)
                .where(spec.moves.c.municipality_code == code)
                .values(state="flipped", flipped_at=flipped, rows=rows, pause_seconds=pause)
            )
        move |= {"state": "flipped", "flipped_at": flipped, "rows": rows, "pause_seconds": pause}
        log.info("%s: %s now on %s (%s)", spec.service, code, target, rows)
    if move["state"] == "flipped":
        async with _transaction(spec.databases.shards[target]) as raw:
            await raw.execute("DELETE FROM shard_fences WHERE municipality_code = $1", code)
        spec.databases.forget(code)
        # Writes resume now: the pause is fence to here (for a resumed move, including the interruption).
        move["pause_seconds"] = (utcnow() - move["fenced_at"]).total_seconds()
        await _set_move(spec, code, pause_seconds=move["pause_seconds"])


async def copy_and_flip(spec: MoveSpec, move: dict[str, Any]) -> None:
    await flip(spec, move, await copy(spec, move))


async def clean(spec: MoveSpec, move: dict[str, Any], *, grace_seconds: float) -> None:
    """After the caches expired: delete the source rows (the source keeps its fence) and close the move."""
    code, source = move["municipality_code"], move["from_shard"]
    if move["state"] != "flipped":
        return
    flipped_at: datetime = move["flipped_at"]
    wait = grace_seconds - (utcnow() - flipped_at).total_seconds()
    if wait > 0:
        await asyncio.sleep(wait)
    async with _transaction(spec.databases.shards[source]) as raw:
        await raw.execute(BYPASS_SQL)
        for t in reversed(spec.tables):
            await raw.execute(f"DELETE FROM {t.name} WHERE {t.where}", code)
        await _stop_capture(spec, raw, code)
    move |= {"state": "done", "finished_at": utcnow()}
    await _set_move(spec, code, state="done", finished_at=move["finished_at"])
    log.info("%s: %s deleted from %s", spec.service, code, source)


async def abort(spec: MoveSpec, move: dict[str, Any]) -> None:
    """Lift the fences of a move that has not flipped yet, and forget it."""
    if move["state"] not in ("fencing", "fenced"):
        raise ShardMoveError(f"{spec.service}: the move of {move['municipality_code']} is past its flip")
    code = move["municipality_code"]
    async with _transaction(spec.databases.shards[move["to_shard"]]) as raw:
        await raw.execute(BYPASS_SQL)
        for t in reversed(spec.tables):  # what a pre-copy left there
            await raw.execute(f"DELETE FROM {t.name} WHERE {t.where}", code)
    for name in (move["from_shard"], move["to_shard"]):
        async with _transaction(spec.databases.shards[name]) as raw:
            await raw.execute("DELETE FROM shard_fences WHERE municipality_code = $1", code)
            if name == move["from_shard"]:
                await _stop_capture(spec, raw, code)
    async with spec.databases.main.sessionmaker() as session, session.begin():
        await session.execute(spec.moves.delete().where(spec.moves.c.municipality_code == move["municipality_code"]))


async def move_municipality(
    specs: Sequence[MoveSpec],
    code: str,
    to: str,
    *,
    grace_seconds: float = SHARD_MAP_TTL_SECONDS + CLEAN_MARGIN_SECONDS,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, dict[str, Any]]:
    """Move ``code`` to shard ``to`` in every service of ``specs``; returns each service's move record.

    Services are fenced in the order given and flipped in the reverse order: a service whose events another
    consumes (registry) is fenced first and released last, so nothing it publishes for the municipality
    reaches the consumer (records) while the consumer's rows are moving.
    """
    async with move_lock(specs, code) as lock:
        return await _move_municipality(specs, lock, to, grace_seconds=grace_seconds, progress=progress)


async def _move_municipality(
    specs: Sequence[MoveSpec], lock: MoveLock, to: str, *, grace_seconds: float, progress: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    code = lock.code
    moves: dict[str, dict[str, Any]] = {}
    for spec in specs:
        move = await plan(spec, code, to)
        if move is not None:
            moves[spec.service] = move
    active = [s for s in specs if s.service in moves]
    started = time.monotonic()
    # The bulk first, every service, while the municipality is served: the fences below wait for none of it.
    # A failed pre-copy leaves the targets fenced and the source serving; running the command again resumes.
    for spec in active:
        copied_before = await precopy(spec, moves[spec.service])
        if copied_before is not None:
            progress(f"{spec.service}: pre-copied {code} to {to} {copied_before}")
    # Each service's copy starts as soon as it is fenced and runs beside the next service's fence and copy.
    copies: dict[str, asyncio.Task[dict[str, int] | None]] = {}
    await lock.check("the fences")
    try:
        for spec in active:
            await fence(spec, moves[spec.service])
            progress(f"{spec.service}: fenced {code}")
            copies[spec.service] = asyncio.create_task(copy(spec, moves[spec.service]))
    except BaseException:
        # Nothing switched yet: give the municipality its writes back rather than leave it fenced.
        for task in copies.values():
            task.cancel()
        await asyncio.gather(*copies.values(), return_exceptions=True)
        for spec in reversed(active):
            if moves[spec.service]["state"] in ("fencing", "fenced"):
                await abort(spec, moves[spec.service])
        raise
    # Every copy verified before anything is switched: a failed one leaves the municipality fenced everywhere
    # (run the command again to resume) rather than half moved.
    copied = dict(zip(copies, await asyncio.gather(*copies.values(), return_exceptions=True), strict=True))
    for result in copied.values():
        if isinstance(result, BaseException):
            raise result
    await lock.check("the switch (the municipality stays fenced until then)")
    for spec in reversed(active):
        result = copied[spec.service]
        await flip(spec, moves[spec.service], None if isinstance(result, BaseException) else result)
        progress(
            f"{spec.service}: {code} on {to}, write pause {moves[spec.service]['pause_seconds']:.3f}s, "
            f"rows {moves[spec.service]['rows']}"
        )
    await lock.check("deleting the source's rows")
    for spec in active:
        await clean(spec, moves[spec.service], grace_seconds=grace_seconds)
        progress(f"{spec.service}: {code} deleted from {moves[spec.service]['from_shard']}")
    log.info("moved %s to %s in %.2fs", code, to, time.monotonic() - started)
    return moves
