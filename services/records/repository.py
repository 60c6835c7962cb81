"""All of records' SQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from services.records.models import CouponProjection, Dose, DoseHistory, IdempotencyClaim, IdempotencyKey
from shared.db import upsert


class DoseRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, dose_id: str, *, for_update: bool = False) -> Dose | None:
        stmt = select(Dose).where(Dose.dose_id == dose_id)
        if for_update:
            stmt = stmt.with_for_update()
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def of_coupons(
        self, coupons: Sequence[tuple[str, str]], *, for_update: bool = False, with_voided: bool = False
    ) -> list[Dose]:
        """Doses of these (municipality, coupon number) pairs, oldest dose first; voided ones only if asked."""
        if not coupons:
            return []
        stmt = (
            select(Dose)
            .where(tuple_(Dose.municipality_code, Dose.coupon_number).in_(coupons))
            .order_by(Dose.dose_number, Dose.vaccinated_on, Dose.recorded_at)
        )
        if not with_voided:
            stmt = stmt.where(Dose.voided.is_(False))
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


class ClaimRepository:
    """Idempotency keys claimed in records' main database, one per caller and key across all shards."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def claim(self, rows: Sequence[dict[str, Any]]) -> dict[str, IdempotencyClaim]:
        """Insert the claims that are new (one statement, keys in a fixed order so concurrent batches cannot
        deadlock) and return every claim of these keys as stored — a concurrent claim of the same key waits
        here on PostgreSQL until the other transaction ends."""
        if not rows:
            return {}
        scope = rows[0]["scope"]
        ordered = sorted(rows, key=lambda r: str(r["key"]))
        await self.session.execute(
            upsert(self.session, IdempotencyClaim.__table__).on_conflict_do_nothing(index_elements=["scope", "key"]),
            ordered,
        )
        stmt = select(IdempotencyClaim).where(
            IdempotencyClaim.scope == scope, IdempotencyClaim.key.in_([r["key"] for r in rows])
        )
        return {
            c.key: c for c in (await self.session.execute(stmt.execution_options(populate_existing=True))).scalars()
        }


class ProjectionRepository:
    """The coupon projection: what records knows of registry's coupons."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_many(self, coupons: Sequence[tuple[str, str]]) -> dict[tuple[str, str], CouponProjection]:
        if not coupons:
            return {}
        stmt = select(CouponProjection).where(
            tuple_(CouponProjection.municipality_code, CouponProjection.coupon_number).in_(sorted(set(coupons)))
        )
        return {(c.municipality_code, c.coupon_number): c for c in (await self.session.execute(stmt)).scalars()}

    async def get(
        self, municipality_code: str, coupon_number: str, *, for_update: bool = False
    ) -> CouponProjection | None:
        stmt = select(CouponProjection).where(
            CouponProjection.municipality_code == municipality_code, CouponProjection.coupon_number == coupon_number
        )
        if for_update:
            stmt = stmt.with_for_update()
        return (await self.session.execute(stmt)).scalar_one_or_none()

    def add(self, coupon: CouponProjection) -> None:
        self.session.add(coupon)
