"""All of gateway's SQL: inserting and reading the audit log (never updating or deleting it)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import RowMapping, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.models import AuditEntry


class AuditRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def last(self) -> AuditEntry | None:
        stmt = select(AuditEntry).order_by(AuditEntry.seq.desc()).limit(1)
        return (await self.session.execute(stmt)).scalar_one_or_none()

    def add(self, entry: AuditEntry) -> None:
        self.session.add(entry)

    async def page(self, *, after_seq: int, limit: int) -> Sequence[RowMapping]:
        """Plain rows, not ORM objects: verifying a long log must not fill the session's identity map."""
        table = AuditEntry.__table__
        stmt = select(table).where(table.c.seq > after_seq).order_by(table.c.seq).limit(limit)
        return (await self.session.execute(stmt)).mappings().all()
