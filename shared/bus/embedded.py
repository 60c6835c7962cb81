"""A durable, partitioned append-only log in one SQLite file: Kafka's semantics for one machine.

WAL mode with ``synchronous=FULL``: an append that returned survives a power loss. Several processes may
append and read at once (SQLite serialises writers). Offsets are dense per partition, starting at 0.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from shared.bus import Message, OutgoingMessage, partition_for
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

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
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
        self._positions = dict(positions)

    def _read(self, max_records: int) -> list[Message]:
        with self._lock:
            conn = self._connect()
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
            if batch or time.monotonic() >= deadline:
                return batch
            # A file has no push notification across processes; a short sleep keeps lag to a few ms.
            await asyncio.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    async def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
