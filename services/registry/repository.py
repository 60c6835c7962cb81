"""All of registry's SQL."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.registry.models import Coupon, MyNumberDirectoryEntry, Resident, outbox
from shared.db import upsert, utcnow
from shared.outbox import OutboxEvent, OutboxRepository


class ResidentRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, municipality_code: str, resident_id: str, *, for_update: bool = False) -> Resident | None:
        stmt = select(Resident).where(
            Resident.municipality_code == municipality_code, Resident.resident_id == resident_id
        )
        if for_update:
            stmt = stmt.with_for_update()
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def holder_of_coupon(self, municipality_code: str, coupon_number: str) -> Resident | None:
        stmt = select(Resident).where(
            Resident.municipality_code == municipality_code, Resident.coupon_number == coupon_number
        )
        return (await self.session.execute(stmt)).scalar_one_or_none()

    def add(self, resident: Resident) -> None:
        self.session.add(resident)

    async def flush(self) -> None:
        await self.session.flush()


class CouponRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._outbox = OutboxRepository(session, outbox)

    async def get(self, municipality_code: str, coupon_number: str, *, for_update: bool = False) -> Coupon | None:
        stmt = select(Coupon).where(
            Coupon.municipality_code == municipality_code, Coupon.coupon_number == coupon_number
        )
        if for_update:
            stmt = stmt.with_for_update()
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def of_resident(self, municipality_code: str, resident_id: str, *, for_update: bool = False) -> list[Coupon]:
        """Every coupon the resident was ever issued (``for_update``: locked, to change them together)."""
        stmt = (
            select(Coupon)
            .where(Coupon.municipality_code == municipality_code, Coupon.resident_id == resident_id)
            .order_by(Coupon.coupon_number)
        )
        if for_update:
            stmt = stmt.with_for_update()
        return list((await self.session.execute(stmt)).scalars())

    def add(self, coupon: Coupon) -> None:
        self.session.add(coupon)

    async def announce(self, events: Sequence[OutboxEvent]) -> None:
        await self._outbox.add(events)


class DirectoryRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def put(self, my_number_hash: bytes, municipality_code: str, resident_id: str) -> None:
        table = MyNumberDirectoryEntry.__table__
        stmt = upsert(self.session, table).values(
            my_number_hash=my_number_hash,
            municipality_code=municipality_code,
            resident_id=resident_id,
            updated_at=utcnow(),
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["my_number_hash", "municipality_code"],
            set_={"resident_id": stmt.excluded.resident_id, "updated_at": stmt.excluded.updated_at},
        )
        await self.session.execute(stmt)

    async def remove(self, my_number_hash: bytes, municipality_code: str) -> None:
        entry = await self.session.get(MyNumberDirectoryEntry, (my_number_hash, municipality_code))
        if entry is not None:
            await self.session.delete(entry)
