"""A durable, partitioned append-only log in one SQLite file: Kafka's semantics for one machine.

WAL mode with ``synchronous=FULL``: an append that returned survives a power loss. Several processes may
append and read at once (SQLite serialises writers). Offsets are dense per partition, starting at 0.

A group here is the simplest thing that is correct: one lease per (topic, group) in the same file. The
holder reads every partition and renews the lease as it polls; the others poll too and take the lease once
it has expired (a holder that was killed) or was given up (one that stopped). Two members can overlap
for a moment only if a holder stalls longer than the lease — the consumer's idempotence (event ids and
positions in its own transaction) keeps that harmless; the lease only keeps the members from doing the
same work twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from shared.bus import Assignment, Message, OutgoingMessage, partition_for
from shared.db import sqlite_wal
from shared.settings import BusSettings

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    appended_at REAL NOT NULL,
    PRIMARY KEY (topic, partition, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS topics (topic TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (topic, grp)
) WITHOUT ROWID;
"""


class EmbeddedLog:
    """Both a :class:`~shared.bus.Publisher` and a :class:`~shared.bus.Source`."""

    def __init__(self, settings: BusSettings, *, topic: str | None = None) -> None:
        self._path = Path(settings.embedded_path)
        self._topic = topic or settings.topic
        self._wanted_partitions = settings.partitions
        self._positions: dict[int, int] = {}
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._partitions: int | None = None
        self._lease_seconds = settings.group_session_seconds
        self._group: str | None = None
        self._holder = uuid.uuid4().hex
        self._holding = False
        self._lease_checked = 0.0
        self._pending: Assignment | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, timeout=30, isolation_level=None, check_same_thread=False)
            sqlite_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO topics(topic, partitions) VALUES (?, ?)",
                (self._topic, self._wanted_partitions),
            )
            # The partition count is fixed when the topic is created, as in Kafka.
            row = conn.execute("SELECT partitions FROM topics WHERE topic = ?", (self._topic,)).fetchone()
            self._partitions = int(row[0])
            self._conn = conn
        return self._conn

    def _append(self, messages: Sequence[OutgoingMessage]) -> None:
        with self._lock:
            conn = self._connect()
            assert self._partitions is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                next_offset: dict[int, int] = {}
                now = time.time()
                for message in messages:
                    p = partition_for(message.key, self._partitions)
                    if p not in next_offset:
                        row = conn.execute(
                            "SELECT COALESCE(MAX(offset) + 1, 0) FROM log WHERE topic = ? AND partition = ?",
                            (self._topic, p),
                        ).fetchone()
                        next_offset[p] = int(row[0])
                    conn.execute(
                        "INSERT INTO log(topic, partition, offset, key, value, appended_at) VALUES (?,?,?,?,?,?)",
                        (self._topic, p, next_offset[p], message.key, message.value, now),
                    )
                    next_offset[p] += 1
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if messages:
            await asyncio.to_thread(self._append, messages)

    async def partitions(self) -> list[int]:
        def count() -> int:
            with self._lock:
                self._connect()
                assert self._partitions is not None
                return self._partitions

        return list(range(await asyncio.to_thread(count)))

    async def assign(self, positions: dict[int, int]) -> None:
        if self._group is not None and not self._holding:
            return  # the lease went elsewhere meanwhile; take_assignment() says so
        self._positions = dict(positions)

    async def join(self, group: str) -> None:
        self._group = group
        self._positions = {}

    def take_assignment(self) -> Assignment | None:
        pending, self._pending = self._pending, None
        return pending

    def rebalancing_for(self) -> float | None:
        """Never: the group's lease changes hands in one write, there is no rebalance to wait for."""
        return None

    async def commit(self, positions: dict[int, int]) -> None:
        """Nothing to do: the lag metric compares :meth:`end_offsets` with the consumer's own positions."""

    async def end_offsets(self) -> dict[int, int]:
        def ends() -> dict[int, int]:
            with self._lock:
                conn = self._connect()
                assert self._partitions is not None
                rows = conn.execute(
                    "SELECT partition, MAX(offset) + 1 FROM log WHERE topic = ? GROUP BY partition", (self._topic,)
                ).fetchall()
                found = {int(p): int(o) for p, o in rows}
                return {p: found.get(p, 0) for p in range(self._partitions)}

        return await asyncio.to_thread(ends)

    def _check_lease(self, conn: sqlite3.Connection) -> None:
        """Renew (holder) or try to take (others) the group's lease; note a change for take_assignment()."""
        now = time.time()
        # The holder renews at a third of the lease; the others look once a second. Idle polls loop every
        # 10 ms and must not write each time.
        if now - self._lease_checked < (self._lease_seconds / 3 if self._holding else 1.0):
            return
        self._lease_checked = now
        cursor = conn.execute(
            "INSERT INTO leases(topic, grp, holder, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(topic, grp) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
            "WHERE leases.holder = excluded.holder OR leases.expires_at < ?",
            (self._topic, self._group, self._holder, now + self._lease_seconds, now),
        )
        holding = cursor.rowcount == 1
        if holding == self._holding:
            return
        assert self._partitions is not None
        everything = set(range(self._partitions))
        self._holding = holding
        self._positions = {}
        self._pending = Assignment(owned=everything, added=everything) if holding else Assignment(revoked=everything)

    def _release(self, conn: sqlite3.Connection) -> None:
        if self._group is not None and self._holding:
            conn.execute(
                "UPDATE leases SET expires_at = 0 WHERE topic = ? AND grp = ? AND holder = ?",
                (self._topic, self._group, self._holder),
            )
            self._holding = False

    def _read(self, max_records: int) -> list[Message]:
        with self._lock:
            conn = self._connect()
            if self._group is not None:
                self._check_lease(conn)
                if self._pending is not None:
                    return []  # the consumer positions the partitions first
            out: list[Message] = []
            for p, start in sorted(self._positions.items()):
                rows = conn.execute(
                    "SELECT offset, key, value FROM log WHERE topic = ? AND partition = ? AND offset >= ? "
                    "ORDER BY offset LIMIT ?",
                    (self._topic, p, start, max_records - len(out)),
                ).fetchall()
                out.extend(Message(partition=p, offset=int(o), key=k, value=bytes(v)) for o, k, v in rows)
                if rows:
                    self._positions[p] = int(rows[-1][0]) + 1
                if len(out) >= max_records:
                    break
            return out

    async def poll(self, *, max_records: int, timeout: float) -> list[Message]:
        deadline = time.monotonic() + timeout
        while True:
            batch = await asyncio.to_thread(self._read, max_records)
            if batch or self._pending is not None or time.monotonic() >= deadline:
                return batch
            # A file has no push notification across processes; a short sleep keeps lag to a few ms.
            await asyncio.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    async def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                # Given up, not left to expire: a member standing by takes over at its next look.
                with contextlib.suppress(sqlite3.Error):
                    self._release(self._conn)
                self._conn.close()
                self._conn = None
