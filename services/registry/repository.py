"""All of registry's SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.registry.models import Coupon, IssuedCertificate, MyNumberDirectoryEntry, Resident, outbox
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


class CertificateRepository:
    """Issued certificates, in registry's main database."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def current_of(self, municipality_code: str, resident_id: str) -> list[IssuedCertificate]:
        """The resident's certificates not revoked yet, locked: issuing and revoking for one resident serialise."""
        stmt = (
            select(IssuedCertificate)
            .where(
                IssuedCertificate.municipality_code == municipality_code,
                IssuedCertificate.resident_id == resident_id,
                IssuedCertificate.revoked_at.is_(None),
            )
            .order_by(IssuedCertificate.issued_at)
            .with_for_update()
        )
        return list((await self.session.execute(stmt)).scalars())

    async def by_rid(self, rid: str) -> IssuedCertificate | None:
        stmt = select(IssuedCertificate).where(IssuedCertificate.rid == rid)
        return (await self.session.execute(stmt)).scalar_one_or_none()

    def add(self, certificate: IssuedCertificate) -> None:
        self.session.add(certificate)

    async def revoke(self, certificate_ids: Sequence[str], *, at: datetime, reason: str) -> None:
        if not certificate_ids:
            return
        stmt = (
            update(IssuedCertificate)
            .where(IssuedCertificate.certificate_id.in_(certificate_ids), IssuedCertificate.revoked_at.is_(None))
            .values(revoked_at=at, revoked_reason=reason)
        )
        await self.session.execute(stmt)

    async def revoked_rids(self, kid: str) -> list[str]:
        stmt = (
            select(IssuedCertificate.rid)
            .where(IssuedCertificate.kid == kid, IssuedCertificate.revoked_at.is_not(None))
            .order_by(IssuedCertificate.revoked_at, IssuedCertificate.rid)
        )
        return list((await self.session.execute(stmt)).scalars())

    async def revoked_count(self, kid: str) -> int:
        stmt = select(func.count()).where(IssuedCertificate.kid == kid, IssuedCertificate.revoked_at.is_not(None))
        return int((await self.session.execute(stmt)).scalar_one())
