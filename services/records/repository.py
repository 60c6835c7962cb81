"""All of records' SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.records.models import Dose, DoseHistory, IdempotencyKey, OutboxEvent
from shared.db import upsert, utcnow
from shared.events import DoseEvent


class DoseRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, dose_id: str, *, for_update: bool = False) -> Dose | None:
        stmt = select(Dose).where(Dose.dose_id == dose_id)
        if for_update:
            stmt = stmt.with_for_update()
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def of_coupons(self, coupons: Sequence[tuple[str, str]], *, for_update: bool = False) -> list[Dose]:
        """Live (not voided) doses of these (municipality, coupon number) pairs, oldest dose first."""
        if not coupons:
            return []
        stmt = (
            select(Dose)
            .where(tuple_(Dose.municipality_code, Dose.coupon_number).in_(coupons), Dose.voided.is_(False))
            .order_by(Dose.dose_number, Dose.vaccinated_on)
        )
        if for_update:
            stmt = stmt.with_for_update()
        return list((await self.session.execute(stmt)).scalars())

    async def of_municipality(self, municipality_code: str, *, status: str | None, limit: int) -> list[Dose]:
        stmt = select(Dose).where(Dose.municipality_code == municipality_code)
        if status is not None:
            stmt = stmt.where(Dose.status == status, Dose.voided.is_(False))
        stmt = stmt.order_by(Dose.recorded_at, Dose.dose_id).limit(limit)
        return list((await self.session.execute(stmt)).scalars())

    def add(self, dose: Dose) -> None:
        self.session.add(dose)

    def add_history(self, entry: DoseHistory) -> None:
        self.session.add(entry)


class IdempotencyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, scope: str, key: str) -> IdempotencyKey | None:
        return await self.session.get(IdempotencyKey, (scope, key), populate_existing=True)

    async def get_many(self, scope: str, keys: Sequence[str]) -> dict[str, IdempotencyKey]:
        stmt = select(IdempotencyKey).where(IdempotencyKey.scope == scope, IdempotencyKey.key.in_(keys))
        return {row.key: row for row in (await self.session.execute(stmt)).scalars()}

    async def claim(self, entries: Sequence[IdempotencyKey]) -> set[str]:
        """Insert the keys in one statement; returns those that were new. On PostgreSQL a concurrent claim of
        the same key waits here until the other transaction ends, so the loser then reads the winner's
        stored answer."""
        if not entries:
            return set()
        table = IdempotencyKey.__table__
        rows = [
            {
                "scope": e.scope,
                "key": e.key,
                "request_hash": e.request_hash,
                "dose_id": e.dose_id,
                "response": e.response,
                "created_at": e.created_at,
            }
            for e in entries
        ]
        stmt = (
            upsert(self.session, table)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["scope", "key"])
            .returning(table.c.key)
        )
        return set((await self.session.execute(stmt)).scalars())


class OutboxRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, event: DoseEvent) -> None:
        self.session.add(
            OutboxEvent(
                event_id=str(event.event_id), key=event.key, payload=event.to_bytes(), created_at=event.occurred_at
            )
        )

    async def claim_unpublished(self, limit: int) -> list[OutboxEvent]:
        """The oldest unpublished events, locked; another relay skips them instead of waiting."""
        stmt = (
            select(OutboxEvent)
            .where(OutboxEvent.published_at.is_(None))
            .order_by(OutboxEvent.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list((await self.session.execute(stmt)).scalars())

    async def purge_published(self, before: datetime) -> int:
        """Drop events published before ``before``: the topic, not the outbox, is the history."""
        result = await self.session.execute(
            delete(OutboxEvent).where(OutboxEvent.published_at.is_not(None), OutboxEvent.published_at < before)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def mark_published(self, ids: Sequence[int], at: datetime | None = None) -> None:
        await self.session.execute(
            update(OutboxEvent).where(OutboxEvent.id.in_(ids)).values(published_at=at or utcnow())
        )
