"""All of gateway's SQL: inserting and reading the audit trail (never updating an entry), and deleting the front of
a chain once past its years, with the cut that says where."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Delete, RowMapping, Select, Table, insert, literal, or_, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.models import AuditCut, AuditEntry
from shared.db import upsert

_TABLE: Table = AuditEntry.__table__  # type: ignore[assignment]
_CUTS: Table = AuditCut.__table__  # type: ignore[assignment]
_COLUMNS = [c.name for c in _TABLE.columns]

# The chains in the trail, one probe of the primary key each (a "loose index scan"): ``SELECT DISTINCT instance``
# reads the whole index, every entry ever kept.
CHAINS = text(
    "WITH RECURSIVE chains(instance) AS ("
    f" SELECT min(instance) FROM {_TABLE.name}"
    " UNION ALL"
    f" SELECT (SELECT min(instance) FROM {_TABLE.name} WHERE instance > chains.instance)"
    " FROM chains WHERE chains.instance IS NOT NULL"
    ") SELECT instance FROM chains WHERE instance IS NOT NULL"
)


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


def last_recorded_before(instance: str, *, after_seq: int, limit: int, before: datetime) -> Select[int, str]:
    """Of the ``limit`` entries of ``instance`` after ``after_seq``, the last recorded before ``before`` (seq, mac): a
    range of the primary key, never more than ``limit`` entries read."""
    return (
        select(_TABLE.c.seq, _TABLE.c.mac)
        .where(
            _TABLE.c.instance == instance,
            _TABLE.c.seq > after_seq,
            _TABLE.c.seq <= after_seq + limit,
            _TABLE.c.recorded_at < before,
        )
        .order_by(_TABLE.c.seq.desc())
        .limit(1)
    )


def entries_through(instance: str, *, after_seq: int, seq: int) -> Delete:
    """The ``DELETE`` of ``instance``'s entries after ``after_seq`` up to ``seq``: a range of the primary key."""
    return _TABLE.delete().where(_TABLE.c.instance == instance, _TABLE.c.seq > after_seq, _TABLE.c.seq <= seq)


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
        """Every chain with entries in the table, and every chain retention cut."""
        chains = set((await self.session.execute(CHAINS)).scalars())
        chains |= set((await self.session.execute(select(_CUTS.c.instance))).scalars())
        return sorted(chains)

    async def cuts(self) -> Sequence[RowMapping]:
        return (await self.session.execute(select(_CUTS).order_by(_CUTS.c.instance))).mappings().all()

    async def cut(self, instance: str) -> RowMapping | None:
        """Where retention cut ``instance``'s chain (None: it was not)."""
        return (await self.session.execute(select(_CUTS).where(_CUTS.c.instance == instance))).mappings().first()

    async def last_recorded_before(
        self, instance: str, *, after_seq: int, limit: int, before: datetime
    ) -> tuple[int, str] | None:
        """Of the ``limit`` entries after ``after_seq``, the last recorded before ``before``: (seq, mac)."""
        stmt = last_recorded_before(instance, after_seq=after_seq, limit=limit, before=before)
        row = (await self.session.execute(stmt)).first()
        return (int(row[0]), str(row[1])) if row is not None else None

    async def cut_through(self, cut: dict[str, Any], *, after_seq: int) -> int:
        """Delete ``cut["instance"]``'s entries after ``after_seq`` up to ``cut["seq"]`` and record ``cut`` (a row
        of ``audit_cuts``) in their place; how many entries went."""
        deleted = await self.session.execute(entries_through(cut["instance"], after_seq=after_seq, seq=cut["seq"]))
        stmt = upsert(self.session, _CUTS).values(cut)
        await self.session.execute(
            stmt.on_conflict_do_update(
                index_elements=[_CUTS.c.instance], set_={k: stmt.excluded[k] for k in cut if k != "instance"}
            )
        )
        return int(deleted.rowcount)  # type: ignore[attr-defined]

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
