"""All of gateway's SQL: inserting and reading the audit trail (never updating or deleting it)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, Table, insert, literal, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.models import AuditEntry

_TABLE: Table = AuditEntry.__table__  # type: ignore[assignment]
_COLUMNS = [c.name for c in _TABLE.columns]


# One statement, one round trip and one parameter for a whole batch on PostgreSQL, committed by itself
# (autocommit): under load each extra round trip (BEGIN, COPY's column look-up, COMMIT) waits for the server to
# be scheduled. The rows go as one JSON array (each row is the entry's canonical JSON, already built for its MAC,
# plus the two MACs) rather than as fifteen typed arrays: asyncpg's array encoder checks every element against
# collections.abc (py-spy: ~250 µs of the gateway's CPU per batch, 40 µs per entry); a text parameter costs
# nothing to encode and PostgreSQL parses it in C.
_BATCH_INSERT_JSON = (
    f"INSERT INTO {_TABLE.name} ({', '.join(_COLUMNS)}) "
    f"SELECT {', '.join(_COLUMNS)} FROM json_populate_recordset(NULL::{_TABLE.name}, $1::json)"
)


async def insert_json_autocommit(driver_connection: Any, rows_json: str) -> None:
    """Store the JSON array ``rows_json`` (objects keyed by column name; a missing key is NULL) in one
    autocommitted statement on an asyncpg connection outside any transaction."""
    await driver_connection.execute(_BATCH_INSERT_JSON, rows_json)


class AuditRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def head(self, instance: str) -> tuple[int, str] | None:
        stmt = (
            select(_TABLE.c.seq, _TABLE.c.mac)
            .where(_TABLE.c.instance == instance)
            .order_by(_TABLE.c.seq.desc())
            .limit(1)
        )
        row = (await self.session.execute(stmt)).first()
        return (int(row[0]), str(row[1])) if row is not None else None

    async def entry(self, instance: str, seq: int) -> RowMapping | None:
        stmt = select(_TABLE).where(_TABLE.c.instance == instance, _TABLE.c.seq == seq)
        return (await self.session.execute(stmt)).mappings().first()

    async def add_many(self, rows: list[dict[str, Any]]) -> None:
        """SQLite's way (executemany); PostgreSQL's is :func:`insert_batch_autocommit`."""
        await self.session.execute(insert(_TABLE), rows)

    async def instances(self) -> list[str]:
        return [str(i) for i in (await self.session.execute(select(_TABLE.c.instance).distinct())).scalars()]

    async def page(self, *, instance: str, after_seq: int, limit: int) -> Sequence[RowMapping]:
        """Plain rows, not ORM objects: verifying a long trail must not fill the session's identity map."""
        stmt = (
            select(_TABLE)
            .where(_TABLE.c.instance == instance, _TABLE.c.seq > after_seq)
            .order_by(_TABLE.c.seq)
            .limit(limit)
        )
        return (await self.session.execute(stmt)).mappings().all()

    async def of_municipality(
        self,
        code: str,
        *,
        since: datetime | None,
        until: datetime | None,
        after: tuple[datetime, str, int] | None,
        limit: int,
    ) -> list[RowMapping]:
        """Entries about the municipality's data or made by it, oldest first, from just after the position ``after``
        (an entry's time, instance and seq). One read per column, each in its index's order and as long as a page,
        merged: never a sort of the whole period (an entry made by the municipality about its own data is in
        both)."""
        order = (_TABLE.c.recorded_at, _TABLE.c.instance, _TABLE.c.seq)
        found: dict[tuple[str, int], RowMapping] = {}
        for column in (_TABLE.c.municipality, _TABLE.c.caller_municipality):
            stmt = select(_TABLE).where(column == code)
            if since is not None:
                stmt = stmt.where(_TABLE.c.recorded_at >= since)
            if until is not None:
                stmt = stmt.where(_TABLE.c.recorded_at < until)
            if after is not None:
                at, instance, seq = after
                stmt = stmt.where(tuple_(*order) > tuple_(literal(at, _TABLE.c.recorded_at.type), instance, seq))
            for row in (await self.session.execute(stmt.order_by(*order).limit(limit))).mappings():
                found[(row["instance"], row["seq"])] = row
        return sorted(found.values(), key=lambda row: (row["recorded_at"], row["instance"], row["seq"]))[:limit]

    async def position(self, code: str, instance: str, seq: int) -> tuple[datetime, str, int] | None:
        """Where an entry of ``code``'s audit trail stands in its order (None: not one of its entries)."""
        at = await self.session.scalar(
            select(_TABLE.c.recorded_at).where(
                _TABLE.c.instance == instance,
                _TABLE.c.seq == seq,
                or_(_TABLE.c.municipality == code, _TABLE.c.caller_municipality == code),
            )
        )
        return None if at is None else (at, instance, seq)
