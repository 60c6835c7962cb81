"""Databases: async SQLAlchemy engines, the shard map, and the per-request unit of work.

A service has one *main* database and, if it is sharded by municipality, several *shard* databases. The
main database of a sharded service holds the shard map (municipality code → shard name); a municipality is
assigned once, on first sight, and stays until an operator moves it (``vrs shards move``, see
:mod:`shared.shardmove`), so adding a shard never reshuffles existing municipalities. Each process keeps the
map in memory for ``SHARD_MAP_TTL_SECONDS`` at most: a move waits longer than that before it deletes the rows
it copied, and a write that reaches the old shard meanwhile is refused there (a fence) and forgets the entry.

The same code runs on PostgreSQL (asyncpg) and, in the embedded default, on SQLite (aiosqlite).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import AfterValidator
from sqlalchemy import (
    ARRAY,
    JSON,
    Column,
    DateTime,
    Delete,
    MetaData,
    String,
    Table,
    bindparam,
    event,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.types import TypeEngine
from sqlalchemy.util import greenlet_spawn


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (stored as UTC): put it back, so answers carry an offset."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# A timestamp read from either database, always with its offset (RFC 3339 ``date-time`` in OpenAPI).
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_wal(cursor: Any, *, timeout: float = 30) -> None:
    """Put an SQLite database in WAL mode (readers beside the one writer). Switching the mode needs the
    database to itself, and SQLite answers "database is locked" at once, without its busy handler, while
    another connection opens it at the same moment: retried here for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def create_engine(url: str, *, pool_size: int = 20, server_settings: Mapping[str, str] | None = None) -> AsyncEngine:
    """An engine for ``url``; ``server_settings`` are PostgreSQL settings of every connection it opens."""
    if is_sqlite(url):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            # FULL makes a commit survive a power loss.
            sqlite_wal(cur)
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # No pre-ping: it costs a round trip per checkout; a dropped connection is invalidated when it fails, and
    # recycling keeps connections younger than any idle timeout on the way.
    # Up to twice ``pool_size`` connections, all kept once opened: SQLAlchemy closes an *overflow* connection
    # as soon as it is returned to a full pool, so a service whose concurrency hovered above pool_size opened
    # (and asyncpg re-introspected types on) a new connection for a tenth of its requests (measured: records,
    # 44 new main-database connections in 18 s of the bench). The same ceiling as pool_size + overflow.
    return create_async_engine(
        url,
        pool_size=2 * pool_size,
        max_overflow=0,
        pool_recycle=1800,
        connect_args={"server_settings": dict(server_settings)} if server_settings else {},
    )


def upsert(session: AsyncSession, table: Any) -> Any:
    """``INSERT`` with ``on_conflict_do_nothing``/``on_conflict_do_update`` for the session's dialect."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


# An index on a column that grows with the table's physical order (a row's creation time), for a job that finds
# old rows (an expiry, a purge): a BRIN index is a few pages for the whole table, and an insert at the table's end
# rarely touches it (a B-tree would be one more write for every row). Its ranges are summarised as they fill,
# not only at the next vacuum: an unsummarised range is read whole by every look-up. ``Index(name, column,
# **BY_AGE)``; SQLite, which has no BRIN, makes it an ordinary index.
BY_AGE: dict[str, Any] = {"postgresql_using": "brin", "postgresql_with": {"autosummarize": "on"}}


def delete_older(table: Table, column: Column[Any], before: datetime, *, limit: int, dialect: str) -> Delete:
    """The ``DELETE`` of up to ``limit`` rows of ``table`` whose ``column`` is before ``before``: found through the
    index by age, deleted by their physical address (PostgreSQL's ``ctid``, a TID scan; SQLite's ``rowid``). A join
    back on the table's key was planned as a scan of the whole table, hashed against the few rows found: a pass
    would have read every key the country ever sent (``test_records_key_expiry.py`` explains the statement)."""
    address: ColumnClause[Any] = literal_column("ctid" if dialect == "postgresql" else "rowid")
    found = select(address).select_from(table).where(column < before).limit(limit)
    return table.delete().where(address.in_(found))


async def take_turn(session: AsyncSession, lock: int) -> bool:
    """Whether this transaction may do a job that one process does at a time (a sweep, an expiry): on
    PostgreSQL a transaction-scoped advisory lock, ``lock`` being the job's fixed 64-bit key, so that of several
    replicas one works while the others go on; SQLite is one process anyway."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(await session.scalar(select(func.pg_try_advisory_xact_lock(lock))))


@dataclass(frozen=True)
class Turns:
    """What :func:`delete_in_turns` did: the rows it deleted, and whether it stopped because another process has
    the job's turn (that process goes on where this one left off)."""

    deleted: int = 0
    taken_elsewhere: bool = False


async def delete_in_turns(
    db: Database, lock: int, delete: Callable[[AsyncSession, int], Awaitable[int]], *, batch_rows: int
) -> Turns:
    """Run ``delete(session, batch_rows)`` (which deletes up to that many rows and says how many) in
    transactions of their own, each under :func:`take_turn` of ``lock``, until a batch comes back short or
    another process has the turn. Short transactions: the deleted rows' locks and the table's vacuum never wait
    on a whole backlog."""
    deleted = 0
    while True:
        async with db.sessionmaker() as session, session.begin():
            if not await take_turn(session, lock):
                return Turns(deleted, taken_elsewhere=True)
            count = await delete(session, batch_rows)
        deleted += count
        if count < batch_rows:
            return Turns(deleted)


@functools.cache
def _array_of(item: TypeEngine[Any]) -> ARRAY[Any]:
    """One ``ARRAY`` type per column type, built once (types hash and compare by identity): a new one per
    statement cost its construction and its cache key's introspection (``get_cls_kwargs``) on every batch,
    about 5 % of the stats consumer's CPU."""
    return ARRAY(item)


def pg_array_type(column: Column[Any]) -> str:
    """``column``'s type as a PostgreSQL array, for a statement written as text that ``unnest``s one array per
    column (``$1::VARCHAR(6)[]``). JSON travels as text (``text[]``), cast back per value by the statement."""
    if isinstance(column.type, JSON):
        return "text[]"
    return f"{column.type.compile(dialect=postgresql.dialect())}[]"  # type: ignore[no-untyped-call]


def upsert_many(
    session: AsyncSession, table: Table, rows: Sequence[Mapping[str, Any]]
) -> tuple[Any, list[dict[str, Any]] | None]:
    """An upsert of many rows in one statement: add ``on_conflict_…`` (and ``returning``) to the statement,
    then execute it with the parameters returned (``None``: none).

    On PostgreSQL the rows travel as one array per column (``INSERT … SELECT unnest(:a), unnest(:b) …``): a
    statement whose text does not depend on the number of rows, prepared once and executed once, instead of
    a bind-and-execute per row (executemany) or a new ``VALUES`` list per batch size. SQLite gets the rows as
    an executemany of the plain upsert. Every row must have the same keys; rows keep their order.
    """
    if session.get_bind().dialect.name != "postgresql":
        return sqlite.insert(table), [dict(row) for row in rows]
    names = list(rows[0]) if rows else [column.name for column in table.columns]
    arrays = select(
        *(
            func.unnest(bindparam(f"unnest_{name}", [row[name] for row in rows], type_=_array_of(table.c[name].type)))
            for name in names
        )
    )
    return postgresql.insert(table).from_select(names, arrays), None


def shard_assignments_table(metadata: MetaData) -> Table:
    """The shard map, created by the main-database migration of every sharded service."""
    return Table(
        "shard_assignments",
        metadata,
        Column("municipality_code", String(6), primary_key=True),
        Column("shard", String(64), nullable=False),
        Column("assigned_at", DateTime(timezone=True), nullable=False),
    )


# How long a process trusts its copy of the shard map (a shard move waits longer before deleting what it moved).
SHARD_MAP_TTL_SECONDS = 2.0

_shard_map_metadata = MetaData()
_shard_assignments = shard_assignments_table(_shard_map_metadata)


@dataclass
class Database:
    url: str
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]

    @classmethod
    def connect(cls, url: str, *, pool_size: int = 20, server_settings: Mapping[str, str] | None = None) -> Database:
        engine = create_engine(url, pool_size=pool_size, server_settings=server_settings)
        return cls(url, engine, async_sessionmaker(engine, expire_on_commit=False, autoflush=False))

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    @contextlib.asynccontextmanager
    async def driver_transaction(self, begin: str = "BEGIN") -> AsyncIterator[Any]:
        """A pooled connection's asyncpg connection (PostgreSQL only) in a transaction of its own: begun with
        ``begin`` (which may add ``SET LOCAL`` statements: one round trip), committed on exit, rolled back if
        the body raises. For a loop that runs a few statements many times a second (the outbox relay): no
        session, no SQLAlchemy connection around it, no greenlet hop per statement. A connection that is lost,
        or still in a transaction after a failure (its rollback failed or was cancelled), is invalidated,
        never given back to the pool."""
        fairy = await self.engine.raw_connection()
        driver: Any = fairy.driver_connection
        try:
            await driver.execute(begin)
            try:
                yield driver
            except BaseException:
                if not driver.is_closed():
                    await driver.execute("ROLLBACK")
                raise
            await driver.execute("COMMIT")
        except BaseException as exc:
            if driver.is_closed() or driver.is_in_transaction():
                await greenlet_spawn(fairy.invalidate, exc)  # closing it may wait on the socket
            else:
                fairy.close()
            raise
        # Back to the pool. Its reset has nothing to do: the transaction was not begun through SQLAlchemy.
        fairy.close()


@dataclass
class Databases:
    main: Database
    shards: dict[str, Database] = field(default_factory=dict)
    # municipality → (shard, monotonic time it was read)
    _assignments: dict[str, tuple[str, float]] = field(default_factory=dict)
    shard_map_ttl: float = SHARD_MAP_TTL_SECONDS
    _map_read: asyncio.Future[None] | None = None  # the whole map's read in flight, shared by its waiters

    @classmethod
    def connect(
        cls,
        main_url: str,
        shard_urls: dict[str, str] | None = None,
        *,
        pool_size: int = 20,
        server_settings: Mapping[str, str] | None = None,
    ) -> Databases:
        def connect(url: str) -> Database:
            return Database.connect(url, pool_size=pool_size, server_settings=server_settings)

        return cls(main=connect(main_url), shards={name: connect(url) for name, url in (shard_urls or {}).items()})

    def default_shard(self, municipality_code: str) -> str:
        names = sorted(self.shards)
        return names[zlib.crc32(municipality_code.encode()) % len(names)]

    def _cached(self, municipality_code: str, now: float) -> str | None:
        entry = self._assignments.get(municipality_code)
        return entry[0] if entry is not None and now - entry[1] < self.shard_map_ttl else None

    async def shard_of(self, municipality_code: str) -> str:
        """The shard that holds ``municipality_code``, assigning one on first sight (cached for ``shard_map_ttl``)."""
        cached = self._cached(municipality_code, time.monotonic())
        if cached is not None:
            return cached
        return (await self.shards_of([municipality_code]))[municipality_code]

    async def shards_of(self, municipality_codes: Iterable[str]) -> dict[str, str]:
        """:meth:`shard_of` for many: what the cache does not hold is read in one query (a batch of doses from
        a thousand municipalities costs one round trip, not one each)."""
        found, stale = self._from_cache(set(municipality_codes))
        if stale:
            # The whole map at once (a row per municipality that ever had a dose or a resident: 1,741 at most):
            # doses come from every municipality, so an entry read one by one was mostly stale again by the
            # next dose of its municipality (measured: a shard-map query for one single dose in five).
            await self._read_map()
            read, unknown = self._from_cache(stale)
            found |= read
            if unknown:  # not in the map yet (assigned now), or the read took longer than the TTL
                found |= await self.current_shards(unknown)
        return found

    def _from_cache(self, municipality_codes: Iterable[str]) -> tuple[dict[str, str], list[str]]:
        """(the fresh cached shards of these codes, the codes without one)."""
        now = time.monotonic()
        found: dict[str, str] = {}
        missing = []
        for code in municipality_codes:
            cached = self._cached(code, now)
            if cached is not None:
                found[code] = cached
            else:
                missing.append(code)
        return found, missing

    async def _read_map(self) -> None:
        """Read every assignment into the cache; callers arriving while a read is in flight wait for it."""
        # A read left pending on another event loop (a closed one, in tests) is not waited for.
        if self._map_read is None or self._map_read.get_loop() is not asyncio.get_running_loop():
            self._map_read = asyncio.ensure_future(self._read_whole_map())
            self._map_read.add_done_callback(self._map_read_done)
        await asyncio.shield(self._map_read)

    def _map_read_done(self, done: asyncio.Future[None]) -> None:
        if self._map_read is done:
            self._map_read = None
        if not done.cancelled():
            done.exception()  # retrieved: every waiter got it raised already

    async def _read_whole_map(self) -> None:
        started = time.monotonic()  # entries age from before the read: never trusted longer than the TTL
        t = _shard_assignments
        async with self.main.sessionmaker() as session:
            rows = (await session.execute(select(t.c.municipality_code, t.c.shard))).all()
        for code, shard in rows:
            if shard in self.shards:  # an unknown shard is refused by current_shards, where it is asked for
                self._assignments[str(code)] = (str(shard), started)

    async def current_shards(self, municipality_codes: Iterable[str]) -> dict[str, str]:
        """The shards of ``municipality_codes`` as the main database has them now (one query; no cache)."""
        codes = sorted(set(municipality_codes))
        if not codes:
            return {}
        t = _shard_assignments
        async with self.main.sessionmaker() as session, session.begin():
            stmt = select(t.c.municipality_code, t.c.shard).where(t.c.municipality_code.in_(codes))
            found = {str(c): str(s) for c, s in (await session.execute(stmt)).all()}
            missing = [c for c in codes if c not in found]
            if missing:
                await session.execute(
                    upsert(session, t)
                    .values(
                        [
                            {"municipality_code": c, "shard": self.default_shard(c), "assigned_at": utcnow()}
                            for c in missing
                        ]
                    )
                    .on_conflict_do_nothing(index_elements=["municipality_code"])
                )
                stmt = select(t.c.municipality_code, t.c.shard).where(t.c.municipality_code.in_(missing))
                found |= {str(c): str(s) for c, s in (await session.execute(stmt)).all()}
        now = time.monotonic()
        for code, shard in found.items():
            if shard not in self.shards:
                raise RuntimeError(f"municipality {code} is mapped to unknown shard {shard!r}")
            self._assignments[code] = (shard, now)
        return found

    def forget(self, municipality_code: str) -> None:
        """Drop the cached shard of ``municipality_code`` (it was found moving): the next use reads the map."""
        self._assignments.pop(municipality_code, None)

    async def ping(self) -> None:
        await self.main.ping()
        for shard in self.shards.values():
            await shard.ping()

    async def dispose(self) -> None:
        await self.main.engine.dispose()
        for shard in self.shards.values():
            await shard.engine.dispose()


class UnitOfWork:
    """The sessions one request touches; committed together when the request succeeds.

    Shards commit before the main database: a main-database row (a directory entry) never points at a
    shard row that was rolled back, and an idempotent retry repairs the rare opposite case.
    """

    def __init__(self, databases: Databases) -> None:
        self._databases = databases
        self._sessions: dict[str | None, AsyncSession] = {}
        self._after_commit: list[Callable[[], None]] = []
        self._touched: set[str] = set()  # shards written without a session (see touch)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once everything is committed (e.g. wake the outbox relay)."""
        self._after_commit.append(callback)

    @property
    def databases(self) -> Databases:
        return self._databases

    def main(self) -> AsyncSession:
        return self._session(None)

    async def for_municipality(self, municipality_code: str) -> AsyncSession:
        return self._session(await self._databases.shard_of(municipality_code))

    @property
    def touched_shards(self) -> list[str]:
        return sorted(self._touched.union(name for name in self._sessions if name is not None))

    def touch(self, shard: str) -> None:
        """Count ``shard`` among the touched ones (whose outbox relay is woken after the commit) although no
        session of it was opened: for statements that commit on a connection of their own."""
        self._touched.add(shard)

    def shard(self, name: str) -> AsyncSession:
        return self._session(name)

    def _session(self, shard: str | None) -> AsyncSession:
        session = self._sessions.get(shard)
        if session is None:
            db = self._databases.main if shard is None else self._databases.shards[shard]
            session = self._sessions[shard] = db.sessionmaker()
        return session

    async def commit(self) -> None:
        for key in sorted(self._sessions, key=lambda k: k is None):
            await self._sessions[key].commit()
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    async def rollback(self) -> None:
        for session in self._sessions.values():
            await session.rollback()

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
        self._touched.clear()

    async def __aenter__(self) -> UnitOfWork:
        return self

    async def __aexit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None:
                await self.commit()
            else:
                await self.rollback()
        finally:
            await self.close()


def request_unit_of_work(request: Request) -> UnitOfWork:
    """The unit of work of one request (``async with`` it: committed when the block succeeds)."""
    uow = UnitOfWork(request.app.state.databases)
    # A service that publishes events keeps its outbox relay in ``app.state.relay``: what this request
    # committed is published at once instead of at the relay's next idle look.
    relay = getattr(request.app.state, "relay", None)
    if relay is not None:
        uow.after_commit(lambda: relay.wake(*uow.touched_shards))
    return uow


async def _unit_of_work(request: Request) -> AsyncIterator[UnitOfWork]:
    async with request_unit_of_work(request) as uow:
        yield uow


# scope="function": commit before the response is sent, so a 2xx always means "stored".
UnitOfWorkDep = Annotated[UnitOfWork, Depends(_unit_of_work, scope="function")]
