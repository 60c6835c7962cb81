"""All of registry's SQL."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from services.registry.models import MyNumberDirectoryEntry, Resident
from shared.db import upsert, utcnow


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

    async def holders_of_coupons(self, coupons: Sequence[tuple[str, str]]) -> list[Resident]:
        if not coupons:
            return []
        stmt = select(Resident).where(tuple_(Resident.municipality_code, Resident.coupon_number).in_(coupons))
        return list((await self.session.execute(stmt)).scalars())

    def add(self, resident: Resident) -> None:
        self.session.add(resident)

    async def flush(self) -> None:
        await self.session.flush()


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
