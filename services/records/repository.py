"""All of records' SQL."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import chain
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import (
    ARRAY,
    JSON,
    Date,
    DateTime,
    Integer,
    String,
    Table,
    any_,
    bindparam,
    cast,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm.attributes import flag_modified
from sqlalchemy.util import greenlet_spawn

from services.records.models import (
    CouponProjection,
    Dose,
    DoseHistory,
    DoseImport,
    IdempotencyClaim,
    IdempotencyKey,
    outbox,
    shard_moves,
)
from shared.coalesce import Coalescer
from shared.db import Database, Databases, UnitOfWork, delete_older, pg_array_type
from shared.shardmove import MovableTable

log = logging.getLogger(__name__)

_doses: Table = Dose.__table__  # type: ignore[assignment]
_keys: Table = IdempotencyKey.__table__  # type: ignore[assignment]
_claims: Table = IdempotencyClaim.__table__  # type: ignore[assignment]
_history: Table = DoseHistory.__table__  # type: ignore[assignment]
_coupons: Table = CouponProjection.__table__  # type: ignore[assignment]


def coupon_lock_key(municipality_code: str, coupon_number: str) -> int:
    """A coupon's advisory-lock key: a signed 64-bit hash (two coupons sharing one only wait on each other)."""
    digest = hashlib.blake2b(f"records-coupon:{municipality_code}:{coupon_number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_ON_FILE_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("key", String()),
    ("request_hash", String()),
    ("response", JSON()),
    ("municipality_code", String()),
    ("coupon_number", String()),
    ("resident_id", String()),
    ("sex", String()),
    ("birth_date", Date()),
    ("invalid_from", Date()),
    ("invalid_reason", String()),
    ("version", Integer()),
    ("dose_id", String()),
    ("coupon_line", String()),
    ("dose_number", Integer()),
    ("vaccinated_on", Date()),
    ("vaccine", String()),
    ("lot_number", String()),
    ("recorded_at", DateTime(timezone=True)),
)
_HOLDER_COLUMNS = (
    "municipality_code", "coupon_number", "resident_id", "sex", "birth_date", "invalid_from", "invalid_reason",
    "version",
)  # fmt: skip
_DOSE_COLUMNS = (
    "municipality_code", "coupon_number", "dose_id", "coupon_line", "dose_number", "vaccinated_on", "vaccine",
    "lot_number", "recorded_at", "version",
)  # fmt: skip
_DOSE_ORDER = ("dose_number", "vaccinated_on", "recorded_at")


def _on_file_statement() -> Any:
    """Built once: the statement and its cache key are reused by every request (bound lists expand)."""
    k, c, d = _keys, _coupons, _doses

    def row(kind: int, **columns: Any) -> Any:
        return select(
            literal(kind).label("kind"),
            *(columns.get(name, cast(null(), type_)).label(name) for name, type_ in _ON_FILE_COLUMNS),
        )

    coupons: Any = bindparam("coupons", expanding=True)
    stmt = union_all(
        row(0, key=k.c.key, request_hash=k.c.request_hash, response=k.c.response).where(
            k.c.scope == bindparam("scope"), k.c.key.in_(bindparam("keys", expanding=True))
        ),
        row(1, **{name: c.c[name] for name in _HOLDER_COLUMNS}).where(
            tuple_(c.c.municipality_code, c.c.coupon_number).in_(coupons)
        ),
        row(2, **{name: d.c[name] for name in _DOSE_COLUMNS}).where(
            tuple_(d.c.municipality_code, d.c.coupon_number).in_(coupons), d.c.voided.is_(False)
        ),
    )
    return stmt.order_by(stmt.selected_columns.kind, *(stmt.selected_columns[n] for n in _DOSE_ORDER))


_ON_FILE = _on_file_statement()

_WRITE_COLUMNS = {
    "k": [c.name for c in _keys.c],
    "d": [c.name for c in _doses.c],
    "o": ["event_id", "key", "payload", "created_at"],
}


# One encoder for every value: ``json.dumps`` with options builds a new encoder per call (a third of its cost
# for the small values of a single dose).
_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _unnest_insert(prefix: str, table: Table, first: int) -> str:
    """``INSERT ... SELECT FROM unnest($n::type[], ...)``: one array parameter per column, from ``$first``, the
    first numbering each row's member; only the rows of the members whose check passed (the ``ok`` of
    :data:`_RECORD_PG`) are stored."""
    names = _WRITE_COLUMNS[prefix]
    columns = {c.name: c for c in table.c}
    types = ["integer[]"] + [pg_array_type(columns[n]) for n in names]
    arrays = ", ".join(f"${first + i}::{t}" for i, t in enumerate(types))
    values = ", ".join(f"{n}::json" if isinstance(columns[n].type, JSON) else n for n in names)
    return (
        f"INSERT INTO {table.name} ({', '.join(names)}) SELECT {values} FROM unnest({arrays}) "
        f"AS t(member_, {', '.join(names)}) WHERE t.member_ = ANY((SELECT passed FROM ok)::integer[])"
    )


_WRITE_JSON = {
    prefix: [(name, isinstance(table.c[name].type, JSON)) for name in _WRITE_COLUMNS[prefix]]
    for prefix, table in (("d", _doses), ("o", outbox), ("k", _keys))
}
# The hot path on PostgreSQL runs on the session's asyncpg connection itself (prepared once per connection by
# asyncpg's statement cache): SQLAlchemy's per-statement work (compiling, bind and result processing) cost
# more CPU than the database did. Round trips cost most (each is a write and a wake-up on both sides), so the
# write is one autocommitted statement: it takes the coupons' locks and checks, under them, that the doses
# on file and the keys answered are still what was read; if not, nothing is written and the caller reads
# again and decides again. Same outcome as holding the locks from before the read, in three round trips
# (claim, read, write) instead of six.
# The statement serves several requests ("members") at once (see write_together): every row is numbered by
# its member; records_writes_as_read (migrations 20261126_02, 20261126_04, 20261127_02, 20261127_03) checks each
# member as if alone and returns those that passed, whose rows alone are stored. A batch, or a lone request, is
# one member. What it checks: the doses on file of the member's coupons (their ids and versions), the coupons'
# holders (their projection versions) and its keys, each still as the member read them. Before all that, once
# per statement, that none of the coupons' municipalities is fenced for a shard move (20261127_06): a double
# scan stores key rows only, which no fence trigger sees; it fails the statement as the triggers do.
_CHECK_ARGS = 12
_FIRST = {"d": _CHECK_ARGS + 1}
_FIRST["o"] = _FIRST["d"] + 1 + len(_WRITE_COLUMNS["d"])
_FIRST["k"] = _FIRST["o"] + 1 + len(_WRITE_COLUMNS["o"])
_RECORD_PG = (
    "WITH ok AS MATERIALIZED (SELECT records_writes_as_read($1::integer, $2::bigint[], $3::integer[], "
    "$4::varchar[], $5::varchar[], $6::integer[], $7::integer[], $8::varchar[], $9::integer[], $10::integer[], "
    "$11::varchar[], $12::varchar[]) AS passed), "
    f"new_doses AS ({_unnest_insert('d', _doses, _FIRST['d'])}), "
    f"new_events AS ({_unnest_insert('o', outbox, _FIRST['o'])}), "
    f"new_keys AS ({_unnest_insert('k', _keys, _FIRST['k'])}) "
    "SELECT passed FROM ok"
)
# LATERAL ... OFFSET 0: one index probe per coupon and per key, whatever the prepared statement's generic plan
# guesses of the arrays. Keys especially: all of a caller's keys share its scope, and ``scope = $1 AND key =
# ANY($4)`` was planned as a scan of every key the caller ever sent (measured: 90-175 ms per 500-dose batch at
# 25,000 keys, growing with the table; a probe per key: under 1 ms). The ``OFFSET 0`` is what keeps it a probe:
# without it the planner pulls the subquery up into a plain join, and the generic plan (ten rows guessed for an
# array) hashed the wanted rows and scanned the caller's keys, the coupons and the doses whole (EXPLAIN of a
# single dose: 1.2-1.5 ms and growing with the tables, against 0.24 ms; a third of PostgreSQL's CPU under load).
# ``tests/integration/services/records/test_records_plans.py`` holds every hot statement to index probes.
# The keys come as (caller, key) pairs: concurrent requests' reads of one shard go together (see on_file).
_ON_FILE_PG = """
WITH wanted AS (SELECT * FROM unnest($2::varchar[], $3::varchar[]) AS w(municipality_code, coupon_number))
SELECT 0 AS kind, k.scope, k.key, k.request_hash, k.response::text AS response,
       NULL::varchar AS municipality_code, NULL::varchar AS coupon_number, NULL::varchar AS resident_id,
       NULL::varchar AS sex, NULL::date AS birth_date, NULL::date AS invalid_from, NULL::varchar AS invalid_reason,
       NULL::integer AS version, NULL::varchar AS dose_id, NULL::varchar AS coupon_line, NULL::integer AS dose_number,
       NULL::date AS vaccinated_on, NULL::varchar AS vaccine, NULL::varchar AS lot_number,
       NULL::timestamptz AS recorded_at
  FROM unnest($1::varchar[], $4::varchar[]) AS a(scope, key) CROSS JOIN LATERAL (
       SELECT * FROM idempotency_keys k WHERE k.scope = a.scope AND k.key = a.key OFFSET 0
  ) AS k
UNION ALL
SELECT 1, NULL, NULL, NULL, NULL, c.municipality_code, c.coupon_number, c.resident_id, c.sex, c.birth_date,
       c.invalid_from, c.invalid_reason, c.version, NULL, NULL, NULL, NULL, NULL, NULL, NULL
  FROM wanted w CROSS JOIN LATERAL (
       SELECT * FROM coupons c WHERE c.municipality_code = w.municipality_code AND c.coupon_number = w.coupon_number
        OFFSET 0
  ) AS c
UNION ALL
SELECT 2, NULL, NULL, NULL, NULL, d.municipality_code, d.coupon_number, NULL, NULL, NULL, NULL, NULL, d.version,
       d.dose_id, d.coupon_line, d.dose_number, d.vaccinated_on, d.vaccine, d.lot_number, d.recorded_at
  FROM wanted w CROSS JOIN LATERAL (
       SELECT * FROM doses d
        WHERE d.municipality_code = w.municipality_code AND d.coupon_number = w.coupon_number AND NOT d.voided
        OFFSET 0
  ) AS d
ORDER BY kind, dose_number, vaccinated_on, recorded_at
"""
# Claims in one statement: insert what is new, read back what another request claimed first (its
# snapshot may miss a claim committed while this one waited on it: those are read again, see claim()). The
# rows may be of several callers (scopes): concurrent requests' claims go together (see ClaimRepository).
_CLAIM_PG = """
WITH wanted AS (
    SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[], $5::timestamptz[])
        AS w(scope, key, request_hash, shard, created_at)
),
claimed AS (
    INSERT INTO idempotency_claims (scope, key, request_hash, shard, created_at)
    SELECT scope, key, request_hash, shard, created_at FROM wanted ORDER BY scope, key
    ON CONFLICT (scope, key) DO NOTHING RETURNING scope, key, request_hash
)
SELECT scope, key, request_hash FROM claimed
UNION ALL
SELECT c.scope, c.key, c.request_hash FROM wanted w CROSS JOIN LATERAL (
    SELECT * FROM idempotency_claims c WHERE c.scope = w.scope AND c.key = w.key OFFSET 0
) AS c
"""
_CLAIMED_PG = """
SELECT c.scope, c.key, c.request_hash FROM unnest($1::varchar[], $2::varchar[]) AS w(scope, key) CROSS JOIN LATERAL (
    SELECT * FROM idempotency_claims c WHERE c.scope = w.scope AND c.key = w.key OFFSET 0
) AS c
"""


# Every statement records prepares finds its rows through an index, a probe per wanted key or coupon (above).
# PostgreSQL's default plans a prepared statement afresh at each execution while it guesses that planning pays
# off; for these it always guessed so (an array parameter of one element looks ten times cheaper than a generic
# plan's guess of ten), so every dose paid for planning its claim and its read: 0.36 ms of the database's CPU
# per read, five times their execution. So records' connections plan each statement once, generically.
SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan"}


# The dose path's connections are kept between requests (LIFO, up to ``pool_size`` per database: half its
# pool, the other half is always there for everything else) instead of going back to SQLAlchemy's pool after
# each lease: a checkout and check-in through the pool, with the greenlet hop the checkout needs, was about
# 8 % of records' CPU per single dose. One parked for longer than SPARE_IDLE_SECONDS goes back to the pool
# (which recycles what is old) instead of being used.
SPARE_IDLE_SECONDS = 30.0


@dataclass
class RecordsDatabases(Databases):
    """records' databases, with the dose path's spare connections (see :func:`_leased`)."""

    spare: dict[str, list[tuple[Any, float]]] = field(default_factory=dict)  # database URL → (fairy, parked at)
    spare_limit: int = 0  # per database
    # Concurrent requests' claims of their keys, one statement for those that arrive together (PostgreSQL).
    claims: Coalescer[dict[str, Any], str] = field(init=False)

    # Concurrent requests' reads of a shard's doses on file, one statement for those that arrive together.
    reads: dict[str, OnFileReads] = field(init=False, default_factory=dict)
    # Concurrent requests' writes of a shard's doses, one statement for those that arrive together.
    writes: dict[str, DoseWrites] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.claims = Coalescer(functools.partial(claim_rows, self))

    def reads_of(self, shard: str) -> OnFileReads:
        if shard not in self.reads:
            self.reads[shard] = Coalescer(functools.partial(read_on_file, self, shard))
        return self.reads[shard]

    def writes_of(self, shard: str) -> DoseWrites:
        if shard not in self.writes:
            self.writes[shard] = Coalescer(functools.partial(write_together, self, shard))
        return self.writes[shard]

    def spare_of(self, database: Database) -> list[tuple[Any, float]]:
        return self.spare.setdefault(database.url, [])

    async def dispose(self) -> None:
        for parked in self.spare.values():
            while parked:
                fairy, _ = parked.pop()
                await greenlet_spawn(fairy.close)
        await super().dispose()


def connect(main_dsn: str, shard_dsns: dict[str, str], *, pool_size: int) -> RecordsDatabases:
    """records' databases, with :data:`SERVER_SETTINGS` on every connection."""
    databases = RecordsDatabases.connect(main_dsn, shard_dsns, pool_size=pool_size, server_settings=SERVER_SETTINGS)
    assert isinstance(databases, RecordsDatabases)  # Databases.connect builds its class
    databases.spare_limit = pool_size  # shared.db.create_engine's pools hold twice pool_size
    return databases


async def _driver_connection(connection: Any) -> Any:
    """The asyncpg connection under a SQLAlchemy connection (in whatever transaction that one is in)."""
    raw = await connection.get_raw_connection()
    return raw.driver_connection


# What asyncpg raises when a statement fails or its connection is lost (see :func:`_lost`).
_DRIVER_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def _lost(exc: BaseException, driver: Any) -> bool:
    """Whether ``exc`` lost the connection rather than failed one statement: anything but an error the server
    answered with, or one after which the connection is closed. A connection the server closed while it was
    idle fails its next statement with an ``InternalClientError``."""
    return not isinstance(exc, asyncpg.PostgresError) or driver.is_closed()


@contextlib.asynccontextmanager
async def _asyncpg(connection: AsyncConnection) -> AsyncIterator[Any]:
    """The asyncpg connection under ``connection``, its errors raised as SQLAlchemy's would be: a write refused
    by a shard fence reaches the app's database-error handler (503, the cached shard forgotten), and a lost
    connection is invalidated instead of going back to the pool."""
    driver = await _driver_connection(connection)
    try:
        yield driver
    except _DRIVER_ERRORS as exc:
        if _lost(exc, driver):
            await connection.invalidate(exc)
            raise OperationalError(None, None, exc) from exc
        raise DBAPIError(None, None, exc) from exc


def _spare(databases: Databases, database: Database) -> tuple[list[tuple[Any, float]], int] | None:
    if not isinstance(databases, RecordsDatabases):
        return None
    return databases.spare_of(database), databases.spare_limit


@contextlib.asynccontextmanager
async def _leased(database: Database, spares: tuple[list[tuple[Any, float]], int] | None) -> AsyncIterator[Any]:
    """An asyncpg connection of ``database``, in no transaction (each statement commits on its own), its
    errors raised as :func:`_asyncpg` raises them. For the dose path, whose statements are all autocommitted:
    a session (and an ``AsyncConnection``) around it only cost CPU — checking a connection out through them,
    beginning and committing a session transaction that never reaches the database, and a greenlet hop for
    each (measured: 17 % of records' CPU per single dose). Taken from ``spare`` if one was parked there
    lately, else from the pool; parked there again after a statement that went well, while there is room."""
    spare, limit = spares or ([], 0)
    fairy = None
    if spare:
        now = time.monotonic()
        while spare and fairy is None:
            fairy, parked_at = spare.pop()
            if fairy.driver_connection.is_closed():
                await greenlet_spawn(fairy.invalidate)
                fairy = None
            elif now - parked_at > SPARE_IDLE_SECONDS:
                fairy.close()  # back to the pool, which recycles or replaces it
                fairy = None
    if fairy is None:
        fairy = await database.engine.raw_connection()
    driver: Any = fairy.driver_connection
    try:
        yield driver
    except _DRIVER_ERRORS as exc:
        if not _lost(exc, driver):  # the statement failed, not the link
            fairy.close()
            raise DBAPIError(None, None, exc) from exc
        # The connection is lost, and those parked beside it most likely too (the server restarted?): all
        # invalidated, so that one failed request stands for them all. Closing may wait on the socket.
        lost, spare[:] = [fairy, *(parked for parked, _ in spare)], []
        await greenlet_spawn(_invalidate, lost, exc)
        raise OperationalError(None, None, exc) from exc
    except BaseException:
        fairy.close()  # whatever happened (a cancelled statement?), the pool's checks see to it
        raise
    if len(spare) < limit and not driver.is_in_transaction():
        now = time.monotonic()
        if spare and now - spare[0][1] > SPARE_IDLE_SECONDS:  # the least recently used: not needed lately
            spare.pop(0)[0].close()
        spare.append((fairy, now))
    else:
        # Back to the pool. Its reset (a rollback) has nothing to do: no transaction was begun through the
        # SQLAlchemy adapter, so it never waits and needs no greenlet. Nor does the pool ever close a connection
        # given back (which would await, and fail here outside a greenlet): shared.db.create_engine's pools have
        # no overflow, so their idle queue always has room for a connection that was checked out of it.
        fairy.close()


def _invalidate(fairies: Sequence[Any], exc: BaseException) -> None:
    for fairy in fairies:
        fairy.invalidate(exc)


_BEGIN_IMMEDIATE = text("BEGIN IMMEDIATE")


class _Row(dict[str, Any]):
    """A row read with asyncpg, readable by attribute as SQLAlchemy's rows are (the service reads both)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# A request of at most this many keys (a single dose, a small batch) waits for the claim or read in flight and
# goes with the next (see ClaimRepository.claim, DoseRepository.on_file); a larger one (a batch of hundreds)
# has statements of its own, so that the single doses behind it do not wait for it.
SHARED_STATEMENT_KEYS = 20

# What the dose path reads of a shard for one request (see DoseRepository.on_file): its answered keys, the
# coupons' holders and their doses on file.
OnFile = tuple[dict[str, tuple[str, Any]], dict[tuple[str, str], Any], list[Any]]
OnFileRequest = tuple[str, Sequence[str], Sequence[tuple[str, str]]]  # (caller's scope, keys, coupons)
OnFileReads = Coalescer[OnFileRequest, OnFile]


def _on_file_args(requests: Sequence[OnFileRequest]) -> list[list[str]]:
    """:data:`_ON_FILE_PG`'s arrays for these requests: (scope, key) pairs and the coupons, each once."""
    keys = sorted({(scope, key) for scope, request_keys, _ in requests for key in request_keys})
    coupons = sorted({coupon for _, _, request_coupons in requests for coupon in request_coupons})
    return [[s for s, _ in keys], [m for m, _ in coupons], [n for _, n in coupons], [k for _, k in keys]]


def _split_on_file(records: Sequence[Any], requests: Sequence[OnFileRequest]) -> list[OnFile]:
    """The rows of one :data:`_ON_FILE_PG` → what each request read (its own keys and coupons only)."""
    answers: dict[tuple[str, str], tuple[str, Any]] = {}
    holders: dict[tuple[str, str], Any] = {}
    doses: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for record in records:
        r = _Row(record)
        if r.kind == 0:  # asyncpg hands JSON back as its text
            answers[(r.scope, r.key)] = (r.request_hash, json.loads(r.response))
        elif r.kind == 1:
            holders[(r.municipality_code, r.coupon_number)] = r
        else:  # in each coupon's order: dose number, date, time recorded
            doses[(r.municipality_code, r.coupon_number)].append(r)
    return [
        (
            {key: answers[(scope, key)] for key in keys if (scope, key) in answers},
            {coupon: holders[coupon] for coupon in coupons if coupon in holders},
            [dose for coupon in dict.fromkeys(coupons) for dose in doses.get(coupon, ())],
        )
        for scope, keys, coupons in requests
    ]


async def read_on_file(databases: Databases, shard: str, requests: list[OnFileRequest]) -> list[OnFile]:
    """PostgreSQL: :meth:`DoseRepository.on_file` of several requests for ``shard``, in one statement."""
    database = databases.shards[shard]
    async with _leased(database, _spare(databases, database)) as conn:
        records = await conn.fetch(_ON_FILE_PG, *_on_file_args(requests))
    return _split_on_file(records, requests)


def _columns(prefix: str, rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """The write's arrays for ``rows`` of one table (``prefix`` of :data:`_WRITE_COLUMNS`), one per column."""
    return [
        [_json(r[name]) for r in rows] if is_json else [r[name] for r in rows] for name, is_json in _WRITE_JSON[prefix]
    ]


@dataclass(frozen=True, slots=True)
class DoseWrite:
    """One request's write of a shard (see :meth:`DoseRepository.record`): what its check compares with what
    it read, and the rows it stores if the check passes."""

    scope: str  # the caller's; ``keys`` are its keys
    coupons: Sequence[tuple[str, str]]  # (municipality, coupon number) read
    versions: Sequence[int]  # each coupon's holder (its projection version) when read, 0 for none
    seen: Sequence[str]  # the ids of those coupons' doses on file when read
    seen_versions: Sequence[int]  # and their versions, in the same order
    keys: Sequence[dict[str, Any]]
    doses: Sequence[dict[str, Any]]
    events: Sequence[dict[str, Any]]

    def holds(self) -> list[tuple[str, ...]]:
        """What no other write of the same statement may share: its coupons and its (caller, key) pairs."""
        return [*self.coupons, *((self.scope, k["key"]) for k in self.keys)]


def _numbered(writes: Sequence[DoseWrite], attr: str) -> tuple[list[int], list[Any]]:
    """Every write's ``attr`` items in order, and beside them the member (index) each is from."""
    parts = [getattr(write, attr) for write in writes]
    members = list(chain.from_iterable([g] * len(part) for g, part in enumerate(parts)))
    return members, list(chain.from_iterable(parts))


def _write_args(writes: Sequence[DoseWrite]) -> list[Any]:
    """:data:`_RECORD_PG`'s parameters: every write's rows, each numbered by its member (its index)."""
    coupon_members, coupons = _numbered(writes, "coupons")
    seen_members, seen = _numbered(writes, "seen")
    _, seen_versions = _numbered(writes, "seen_versions")
    key_members, keys = _numbered(writes, "keys")
    args: list[Any] = [
        len(writes),
        sorted({coupon_lock_key(m, c) for m, c in coupons}),
        coupon_members,
        [m for m, _ in coupons],
        [c for _, c in coupons],
        list(chain.from_iterable(write.versions for write in writes)),
        seen_members,
        seen,
        seen_versions,
        key_members,
        [k["scope"] for k in keys],
        [k["key"] for k in keys],
    ]
    for prefix, attr in (("d", "doses"), ("o", "events"), ("k", "keys")):
        members, rows = _numbered(writes, attr)
        args += [members, *_columns(prefix, rows)]
    return args


def statements_of(writes: Sequence[DoseWrite]) -> list[list[int]]:
    """The writes' indexes, as statements of writes that share no coupon and no key: each write goes in the
    statement after the last one holding something it holds (in the order they came), else in the first."""
    statements: list[list[int]] = []
    last: dict[tuple[str, ...], int] = {}
    for i, write in enumerate(writes):
        held = write.holds()
        n = max((last[h] + 1 for h in held if h in last), default=0)
        if n == len(statements):
            statements.append([])
        statements[n].append(i)
        for h in held:
            last[h] = n
    return statements


DoseWrites = Coalescer[DoseWrite, bool | DBAPIError]


async def write_together(databases: Databases, shard: str, writes: list[DoseWrite]) -> list[bool | DBAPIError]:
    """PostgreSQL: :meth:`DoseRepository.record` of several requests for ``shard``, one statement for those that
    share no coupon and no key (usually all of them). Each gets what it would have got alone: True (stored),
    False (its check failed: nothing of it stored) or the database's error. If a shared statement fails (a
    shard fence for one member's municipality, a lost connection) nothing of it was stored, and each of its
    members is written alone, so that one request's error is its own."""
    database = databases.shards[shard]
    spares = _spare(databases, database)
    results: list[bool | DBAPIError] = [False] * len(writes)

    async def alone(i: int) -> None:
        try:
            async with _leased(database, spares) as conn:
                results[i] = await conn.fetchval(_RECORD_PG, *_write_args([writes[i]])) == [0]
        except DBAPIError as exc:
            results[i] = exc

    for members in statements_of(writes):
        if len(members) == 1:
            await alone(members[0])
            continue
        try:
            async with _leased(database, spares) as conn:
                passed = set(await conn.fetchval(_RECORD_PG, *_write_args([writes[i] for i in members])))
        except DBAPIError as exc:
            # Expected while a municipality of this shard is fenced for a move (a few tenths of a second); a
            # statement that keeps failing would cost every dose a second round trip, so it is said.
            log.warning(
                "a shared dose write failed (%s): its %d writes go one by one", type(exc.orig).__name__, len(members)
            )
            for i in members:
                await alone(i)
            continue
        for g, i in enumerate(members):
            results[i] = g in passed
    return results


def _of_coupons(statement: Any, entity: Any, session: AsyncSession, coupons: Sequence[tuple[str, str]]) -> Any:
    """``statement`` narrowed to these (municipality, coupon number) pairs. PostgreSQL: joined to the pairs'
    arrays, one index probe per pair, with a statement text that does not change with their number (a
    ``(a, b) IN (...)`` of a thousand pairs is a thousand bind parameters and a new plan per batch size);
    SQLite: the tuple ``IN``."""
    if session.get_bind().dialect.name != "postgresql":
        return statement.where(tuple_(entity.municipality_code, entity.coupon_number).in_(coupons))
    wanted = select(
        func.unnest(bindparam("wanted_m", [m for m, _ in coupons], type_=ARRAY(String))).label("m"),
        func.unnest(bindparam("wanted_c", [c for _, c in coupons], type_=ARRAY(String))).label("c"),
    ).subquery()
    return statement.join(wanted, (entity.municipality_code == wanted.c.m) & (entity.coupon_number == wanted.c.c))


def _dialect_insert(dialect: str, table: Table) -> Any:
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


# Built once per dialect; executed with one parameter set per key (one multi-row INSERT on the wire).
_CLAIM = {
    postgres: _dialect_insert("postgresql" if postgres else "sqlite", _claims)
    .on_conflict_do_nothing(index_elements=["scope", "key"])
    .returning(_claims.c.key, _claims.c.request_hash)
    for postgres in (False, True)
}


_LOCK_COUPONS = text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) AS k")

_MOVED_COLUMNS = ("resident_id", "sex", "age_band", "age_band_10", "status", "version", "updated_at")


class DoseRepository:
    def __init__(
        self,
        session: AsyncSession | None,
        *,
        lease: Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None = None,
        reads: OnFileReads | None = None,
        writes: DoseWrites | None = None,
    ) -> None:
        self._session = session
        # PostgreSQL's dose path: an asyncpg connection leased per statement (see dose_path), and the shard's
        # reads and writes shared by concurrent requests.
        self._lease = lease
        self._reads = reads
        self._writes = writes

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            raise RuntimeError("this repository has only the dose path's connection (see dose_path)")
        return self._session

    def _on_postgres(self) -> bool:
        return self._lease is not None or self.session.get_bind().dialect.name == "postgresql"

    async def _run(self, method: str, query: str, *args: Any) -> Any:
        """``query`` run by asyncpg's ``method`` (fetch, fetchval) on the leased connection, or the session's."""
        if self._lease is not None:
            async with self._lease() as conn:
                return await getattr(conn, method)(query, *args)
        async with _asyncpg(await self.session.connection()) as conn:
            return await getattr(conn, method)(query, *args)

    async def get(self, dose_id: str, *, for_update: bool = False) -> Dose | None:
        stmt = select(Dose).where(Dose.dose_id == dose_id)
        if for_update:  # as it is now, not as this session loaded it before it waited for the row
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def of_coupons(
        self, coupons: Sequence[tuple[str, str]], *, for_update: bool = False, with_voided: bool = False
    ) -> list[Dose]:
        """Doses of these (municipality, coupon number) pairs, oldest dose first; voided ones only if asked."""
        if not coupons:
            return []
        stmt = _of_coupons(select(Dose), Dose, self.session, coupons).order_by(
            Dose.dose_number, Dose.vaccinated_on, Dose.recorded_at
        )
        if not with_voided:
            stmt = stmt.where(Dose.voided.is_(False))
        if for_update:
            stmt = stmt.with_for_update(of=Dose)
        return list((await self.session.execute(stmt)).scalars())

    async def count_of_coupons(self, coupons: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """How many doses (not voided) each of these coupons has, those with none left out: read, not locked."""
        if not coupons:
            return {}
        stmt = _of_coupons(
            select(Dose.municipality_code, Dose.coupon_number, func.count()), Dose, self.session, coupons
        ).where(Dose.voided.is_(False))
        rows = await self.session.execute(stmt.group_by(Dose.municipality_code, Dose.coupon_number))
        return {(m, c): n for m, c, n in rows}

    async def versions(self, doses: Sequence[tuple[str, str]]) -> list[tuple[str, int, str, bool]]:
        """(dose id, version, status, voided) of these (municipality, dose id) pairs: columns only, by key.

        Looked up by the key alone (a row-value ``IN`` of a thousand pairs is planned as a scan), the
        municipality checked on the rows found: a dose of another municipality is as absent as an unknown id."""
        if not doses:
            return []
        wanted = dict((d, m) for m, d in doses)
        ids = list(wanted)
        if self.session.get_bind().dialect.name == "postgresql":
            # One array parameter: a thousand separate ones cost more to render than the query takes.
            key = Dose.dose_id == any_(bindparam("ids", ids, type_=postgresql.ARRAY(postgresql.VARCHAR)))
        else:
            key = Dose.dose_id.in_(ids)
        stmt = select(Dose.dose_id, Dose.municipality_code, Dose.version, Dose.status, Dose.voided).where(key)
        rows = await self.session.execute(stmt)
        return [(r.dose_id, r.version, r.status, r.voided) for r in rows if wanted[r.dose_id] == r.municipality_code]

    async def of_municipality(self, municipality_code: str, *, status: str | None, limit: int) -> list[Dose]:
        stmt = select(Dose).where(Dose.municipality_code == municipality_code)
        if status is not None:
            stmt = stmt.where(Dose.status == status, Dose.voided.is_(False))
        stmt = stmt.order_by(Dose.recorded_at, Dose.dose_id).limit(limit)
        return list((await self.session.execute(stmt)).scalars())

    async def begin(self) -> None:
        """Begin the dose path's transaction: what it reads stays true until it writes (see :meth:`record`).

        SQLite has no advisory locks but one writer per database: the transaction begins ``IMMEDIATE``,
        taking the write lock before the read (it serialises the shard's dose writes; fine for the embedded
        mode). PostgreSQL: nothing here — :meth:`record` takes the coupons' locks and checks under them.
        """
        if not self._on_postgres():
            driver: Any = await _driver_connection(await self.session.connection())
            if not driver.in_transaction:  # else the caller's transaction already wrote, and holds the lock
                await self.session.execute(_BEGIN_IMMEDIATE)

    async def on_file(self, scope: str, keys: Sequence[str], coupons: Sequence[tuple[str, str]]) -> OnFile:
        """Everything the dose path reads, in one statement (one round trip whatever the batch size):

        - ``key → (request hash, answer)`` of the keys already answered;
        - ``(municipality, coupon) → holder`` from the coupon projection;
        - the coupons' doses not voided, oldest first.

        PostgreSQL: a few keys (a single dose) are read together with those of the other requests of this
        process for the same shard that arrive meanwhile (:class:`shared.coalesce.Coalescer`): one statement
        for them all. What each request gets is what it would have read alone, a moment later at most — and the
        write checks, under the coupons' locks, that nothing changed since (:meth:`record`).
        """
        if self._on_postgres():
            request = (scope, keys, coupons)
            if self._reads is not None and len(keys) <= SHARED_STATEMENT_KEYS:
                [found] = await self._reads.submit([request])
                return found
            [found] = _split_on_file(await self._run("fetch", _ON_FILE_PG, *_on_file_args([request])), [request])
            return found
        rows = await self.session.execute(_ON_FILE, {"scope": scope, "keys": list(keys), "coupons": list(coupons)})
        answers: dict[str, tuple[str, Any]] = {}
        holders: dict[tuple[str, str], Any] = {}
        doses: list[Any] = []
        for r in rows:
            if r.kind == 0:
                answers[r.key] = (r.request_hash, json.loads(r.response) if isinstance(r.response, str) else r.response)
            elif r.kind == 1:
                holders[(r.municipality_code, r.coupon_number)] = r
            else:
                doses.append(r)
        return answers, holders, doses

    async def record(
        self,
        keys: Sequence[dict[str, Any]],
        doses: Sequence[dict[str, Any]],
        events: Sequence[dict[str, Any]],
        *,
        scope: str,
        coupons: Sequence[tuple[str, str]],
        versions: Sequence[int],
        seen: Sequence[str],
        seen_versions: Sequence[int],
    ) -> bool:
        """Store the answers, the new doses and their outbox events — if the doses on file of ``coupons`` are
        still ``seen`` (the ids :meth:`on_file` returned, at ``seen_versions``: a correction since changes the
        facts a new dose is decided on), their holders still those of ``versions`` (the
        projection's versions read, 0 for none) and none of the keys was answered since. False when
        something changed: nothing was stored, read again and decide again.

        PostgreSQL: one autocommitted statement (unless the session's transaction already began), which takes
        a transaction-scoped advisory lock per coupon, in one fixed order (no deadlock between two batches),
        before it checks: two requests for the same coupon cannot both write on a view without the other's
        dose; the second reads the first's dose and answers ``duplicate`` or ``needs_review``. Each table is
        fed by ``unnest`` of one array per column, so its text and plan are the same whatever the batch size.
        A few keys (a single dose) are written together with the other requests of this process for the same
        shard that arrive meanwhile (:func:`write_together`): one statement and one commit for them all, each
        checked and stored, or not, as it would have been alone. records' coupon consumer takes the same locks
        before it reads the doses of the coupons it changes (:meth:`lock_coupons`): a write waiting for it
        finds the holder changed; a write it waits for, it reads.
        SQLite: under the write lock :meth:`begin` took nothing can have changed; one statement per table.
        """
        if self._on_postgres():
            write = DoseWrite(scope, coupons, versions, seen, seen_versions, keys, doses, events)
            if self._writes is not None and len(keys) <= SHARED_STATEMENT_KEYS:
                [written] = await self._writes.submit([write])
                if isinstance(written, DBAPIError):
                    raise written
                return written
            return bool(await self._run("fetchval", _RECORD_PG, *_write_args([write])) == [0])
        for table, rows in ((_keys, keys), (_doses, doses), (outbox, events)):
            if rows:
                await self.session.execute(insert(table), list(rows))
        return True

    async def lock_coupons(self, coupons: Sequence[tuple[str, str]]) -> None:
        """Take, to the end of the session's transaction, the coupons' advisory locks the dose path's writes
        take (:meth:`record`), in the same sorted order. PostgreSQL; on SQLite one writer at a time already."""
        if coupons and self._on_postgres():
            keys = sorted({coupon_lock_key(m, c) for m, c in coupons})
            await self.session.execute(_LOCK_COUPONS, {"keys": keys})

    def add(self, dose: Dose) -> None:
        self.session.add(dose)

    def moved(self, dose: Dose) -> None:
        """``dose`` was brought to its coupon's holder: every column such a move may change goes in its UPDATE,
        changed or not. The session's flush writes one UPDATE per run of doses with the same changed columns, in
        their order, and a coupon-event batch mixes matches (the holder set) with sex or birth-date changes: one
        statement a dose, a round trip each while the batch holds the doses' locks (in make soak a batch moving
        thousands held them for 8 s). The same columns for every moved dose: one executemany. A dose a coupon's
        end sends to review changes its findings too: those few get an UPDATE of their own, and the findings (a
        JSON column) stay out of the many: with them a move cost 8 % more."""
        for name in _MOVED_COLUMNS:
            flag_modified(dose, name)

    async def add_history(self, rows: Sequence[dict[str, Any]]) -> None:
        """History rows (see :class:`DoseHistory`), in one multi-row insert."""
        if rows:
            await self.session.execute(insert(_history), list(rows))


@contextlib.asynccontextmanager
async def dose_path(uow: UnitOfWork, shard: str) -> AsyncIterator[DoseRepository]:
    """The dose path's repository for ``shard``: :meth:`DoseRepository.on_file` and :meth:`DoseRepository.record`.

    PostgreSQL: each statement on a connection leased for it alone (:func:`_leased`), which commits by itself,
    so the unit of work has nothing to commit there, but learns the shard was written (its relay is woken).
    No connection is held between the read and the write: a request waiting for a read shared with others
    holds none. SQLite: the unit of work's session, whose transaction holds the write lock from the read to
    the write.
    """
    database = uow.databases.shards[shard]
    if database.engine.dialect.name != "postgresql":
        yield DoseRepository(uow.shard(shard))
        return
    uow.touch(shard)
    databases = uow.databases
    lease = functools.partial(_leased, database, _spare(databases, database))
    if isinstance(databases, RecordsDatabases):
        yield DoseRepository(None, lease=lease, reads=databases.reads_of(shard), writes=databases.writes_of(shard))
    else:
        yield DoseRepository(None, lease=lease)


@contextlib.asynccontextmanager
async def locked_dose_path(
    uow: UnitOfWork, shard: str, coupons: Sequence[tuple[str, str]]
) -> AsyncIterator[DoseRepository]:
    """PostgreSQL: the dose path for ``shard`` in a transaction of its own that holds ``coupons``' locks from
    before its read until it commits, so nothing its write checks can change meanwhile and the write passes.
    The fallback of a request whose writes kept finding their coupons changed (a coupon-event backlog moving
    them one transaction after another, a storm of doses on one coupon): it holds the locks while it decides,
    so it is not the rule. It commits before the request goes on to another shard: the locks of two databases
    are never held together (a wait across databases is a deadlock neither would detect)."""
    async with uow.databases.shards[shard].sessionmaker() as session, session.begin():
        repo = DoseRepository(session)
        await repo.lock_coupons(coupons)
        yield repo


class ClaimRepository:
    """Idempotency keys claimed in records' main database, one per caller and key across all shards."""

    def __init__(self, databases: Databases) -> None:
        self.databases = databases
        self.database = databases.main

    async def claim(self, rows: Sequence[dict[str, Any]]) -> dict[str, str]:
        """Claim the keys; returns ``key → request hash`` as stored (the first body a key came with).

        One autocommitted statement, not a part of the request's transaction: a claim only binds a key to its
        first body (what a later body is compared with), and a claim whose dose was then rolled back is
        harmless — the retry with the same body finds its own claim and records the dose. It spares the
        dose path a second transaction (BEGIN and COMMIT) in the main database. Keys are inserted in a
        fixed order, so concurrent batches cannot deadlock; a key claimed by someone else is read back.

        PostgreSQL: a few keys (a single dose) are claimed together with those of the other requests of this
        process that arrive meanwhile (:class:`shared.coalesce.Coalescer`): one statement and one commit for
        them all instead of one each. A batch's keys go in a statement of their own.
        """
        if not rows:
            return {}
        if self.database.engine.dialect.name == "postgresql":
            if isinstance(self.databases, RecordsDatabases) and len(rows) <= SHARED_STATEMENT_KEYS:
                hashes = await self.databases.claims.submit(rows)
            else:
                hashes = await claim_rows(self.databases, rows)
            return {r["key"]: h for r, h in zip(rows, hashes, strict=True)}
        t = _claims
        ordered = sorted(rows, key=lambda r: str(r["key"]))
        async with self.database.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            claim = _CLAIM[conn.dialect.name == "postgresql"]
            claimed = {row.key: row.request_hash for row in await conn.execute(claim, ordered)}
            missing = [r["key"] for r in rows if r["key"] not in claimed]
            if missing:
                found = select(t.c.key, t.c.request_hash).where(t.c.scope == rows[0]["scope"], t.c.key.in_(missing))
                claimed |= {row.key: row.request_hash for row in await conn.execute(found)}
        return claimed


async def claim_rows(databases: Databases, rows: Sequence[dict[str, Any]]) -> list[str]:
    """PostgreSQL: claim these rows (of any callers) in one statement; each row's stored request hash, in order.

    Two rows with the same caller and key (a retry racing its original) are claimed once: the first body
    wins, as it would have if they had come one after the other."""
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        first.setdefault((row["scope"], row["key"]), row)
    ordered = [first[k] for k in sorted(first)]
    database = databases.main
    async with _leased(database, _spare(databases, database)) as conn:  # no transaction: autocommitted
        found = await conn.fetch(
            _CLAIM_PG,
            [r["scope"] for r in ordered],
            [r["key"] for r in ordered],
            [r["request_hash"] for r in ordered],
            [r["shard"] for r in ordered],
            [r["created_at"] for r in ordered],
        )
        claimed = {(r["scope"], r["key"]): r["request_hash"] for r in found}
        missing = [k for k in first if k not in claimed]
        if missing:
            again = await conn.fetch(_CLAIMED_PG, [s for s, _ in missing], [k for _, k in missing])
            claimed |= {(r["scope"], r["key"]): r["request_hash"] for r in again}
    return [claimed[(r["scope"], r["key"])] for r in rows]


class ProjectionRepository:
    """The coupon projection: what records knows of registry's coupons."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_many(
        self, coupons: Sequence[tuple[str, str]], *, for_update: bool = False
    ) -> dict[tuple[str, str], CouponProjection]:
        """The projection of these coupons (those it has). ``for_update`` locks them in key order."""
        if not coupons:
            return {}
        t = CouponProjection
        stmt = _of_coupons(select(t), t, self.session, sorted(set(coupons)))
        if for_update:
            stmt = stmt.order_by(t.municipality_code, t.coupon_number).with_for_update(of=t)
        return {(c.municipality_code, c.coupon_number): c for c in (await self.session.execute(stmt)).scalars()}

    async def get(self, municipality_code: str, coupon_number: str) -> CouponProjection | None:
        stmt = select(CouponProjection).where(
            CouponProjection.municipality_code == municipality_code, CouponProjection.coupon_number == coupon_number
        )
        return (await self.session.execute(stmt)).scalar_one_or_none()

    def add(self, coupon: CouponProjection) -> None:
        self.session.add(coupon)


class ImportRepository:
    """Dose CSV imports (main database)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, entry: DoseImport) -> None:
        self.session.add(entry)

    async def get(self, import_id: str, *, for_update: bool = False) -> DoseImport | None:
        stmt = select(DoseImport).where(DoseImport.import_id == import_id)
        if for_update:
            stmt = stmt.with_for_update()
        return (await self.session.execute(stmt.execution_options(populate_existing=True))).scalar_one_or_none()

    async def take_next(self, *, now: datetime, lease: timedelta) -> str | None:
        """Lease the oldest unfinished import nobody is working on (or whose worker stopped renewing)."""
        t = DoseImport
        stmt = (
            select(t.import_id)
            .where(t.finished_at.is_(None), or_(t.lease_until.is_(None), t.lease_until < now))
            .order_by(t.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        import_id = (await self.session.execute(stmt)).scalar_one_or_none()
        if import_id is not None:
            await self.session.execute(
                update(DoseImport).where(t.import_id == import_id).values(lease_until=now + lease)
            )
        return import_id


class KeyExpiryRepository:
    """Idempotency keys past their window (services/records/housekeeping.py): the claims in the main database,
    the answers in each shard."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def delete_claims_before(self, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` claims (main database) created before ``before``; how many."""
        return await self._delete_older(_claims, before, limit)

    async def delete_answers_before(self, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` answered keys (a shard) created before ``before``; how many."""
        return await self._delete_older(_keys, before, limit)

    async def _delete_older(self, table: Table, before: datetime, limit: int) -> int:
        dialect = self.session.get_bind().dialect.name
        stmt = delete_older(table, table.c.created_at, before, limit=limit, dialect=dialect)
        return int((await self.session.execute(stmt)).rowcount)  # type: ignore[attr-defined]

    async def moving_shards(self) -> set[str]:
        """The shards a shard move not yet done comes from or goes to (main database)."""
        rows = await self.session.execute(
            select(shard_moves.c.from_shard, shard_moves.c.to_shard).where(shard_moves.c.state != "done")
        )
        return {shard for row in rows for shard in row}


_OF_DOSES = "dose_id IN (SELECT dose_id FROM doses WHERE municipality_code = $1)"
# What a shard move (``vrs shards move``, shared/shardmove.py) carries of a municipality, in copy order (doses
# before the rows found through them); ``$1`` is its code. Unpublished dose events move with it.
MOVABLE_TABLES = (
    MovableTable(Dose.__table__, "municipality_code = $1"),  # type: ignore[arg-type]
    MovableTable(IdempotencyKey.__table__, _OF_DOSES, found_through="doses"),  # type: ignore[arg-type]
    MovableTable(
        DoseHistory.__table__,  # type: ignore[arg-type]
        _OF_DOSES,
        skip=("id",),
        order_by="id",
        found_through="doses",
    ),
    MovableTable(CouponProjection.__table__, "municipality_code = $1"),  # type: ignore[arg-type]
    MovableTable(outbox, "key = $1", copy_where="key = $1 AND published_at IS NULL", skip=("id",), order_by="id"),
)
