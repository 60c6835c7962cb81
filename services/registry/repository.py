"""All of registry's SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, delete, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.registry.models import (
    Coupon,
    MyNumberDirectoryEntry,
    Resident,
    ResidentHistory,
    ResidentImport,
    ResidentImportChunk,
    ResidentImportError,
    outbox,
)
from shared.db import upsert, utcnow
from shared.outbox import OutboxEvent, OutboxRepository

_residents: Table = Resident.__table__  # type: ignore[assignment]
_coupons: Table = Coupon.__table__  # type: ignore[assignment]
_directory: Table = MyNumberDirectoryEntry.__table__  # type: ignore[assignment]
_history: Table = ResidentHistory.__table__  # type: ignore[assignment]
_import_chunks: Table = ResidentImportChunk.__table__  # type: ignore[assignment]
_import_errors: Table = ResidentImportError.__table__  # type: ignore[assignment]


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

    def add_history(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            self.session.add(ResidentHistory(**row))

    async def insert_history(self, rows: Sequence[dict[str, Any]]) -> None:
        await self.session.execute(insert(_history), list(rows))

    async def history(self, municipality_code: str, resident_id: str) -> list[ResidentHistory]:
        stmt = (
            select(ResidentHistory)
            .where(ResidentHistory.municipality_code == municipality_code, ResidentHistory.resident_id == resident_id)
            .order_by(ResidentHistory.version)
        )
        return list((await self.session.execute(stmt)).scalars())

    async def states(self, municipality_code: str, resident_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored columns of these residents, locked for the batch that is about to change them."""
        if not resident_ids:
            return {}
        stmt = (
            select(_residents)
            .where(_residents.c.municipality_code == municipality_code, _residents.c.resident_id.in_(resident_ids))
            .with_for_update()
        )
        return {row.resident_id: dict(row._mapping) for row in await self.session.execute(stmt)}

    async def present(self, municipality_code: str, resident_ids: Sequence[str]) -> set[str]:
        """Those of ``resident_ids`` registered here and not moved out."""
        if not resident_ids:
            return set()
        stmt = select(_residents.c.resident_id).where(
            _residents.c.municipality_code == municipality_code,
            _residents.c.resident_id.in_(resident_ids),
            _residents.c.moved_on.is_(None),
        )
        return set((await self.session.execute(stmt)).scalars())

    async def upsert_many(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or replace whole resident rows (one statement, executed for all rows in one go)."""
        stmt = upsert(self.session, _residents)
        keep = {"municipality_code", "resident_id", "created_at"}
        stmt = stmt.on_conflict_do_update(
            index_elements=["municipality_code", "resident_id"],
            set_={c.name: stmt.excluded[c.name] for c in _residents.columns if c.name not in keep},
        )
        await self.session.execute(stmt, list(rows))

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

    async def rows_of_residents(self, municipality_code: str, resident_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Every coupon of these residents as plain rows (an import plans them without the ORM), locked."""
        stmt = (
            select(_coupons)
            .where(_coupons.c.municipality_code == municipality_code, _coupons.c.resident_id.in_(resident_ids))
            .with_for_update()
        )
        return [dict(row._mapping) for row in await self.session.execute(stmt)]

    async def numbers_of(self, residents: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
        """(municipality, resident id) → every coupon number it was issued, in one query."""
        if not residents:
            return {}
        stmt = select(_coupons.c.municipality_code, _coupons.c.resident_id, _coupons.c.coupon_number).where(
            tuple_(_coupons.c.municipality_code, _coupons.c.resident_id).in_(residents)
        )
        found: dict[tuple[str, str], list[str]] = {}
        for municipality, resident, number in await self.session.execute(stmt):
            found.setdefault((municipality, resident), []).append(number)
        return found

    async def issued_to(self, municipality_code: str, numbers: Sequence[str]) -> dict[str, str]:
        """coupon number → the resident it was issued to, for those of ``numbers`` ever issued."""
        if not numbers:
            return {}
        stmt = select(_coupons.c.coupon_number, _coupons.c.resident_id).where(
            _coupons.c.municipality_code == municipality_code, _coupons.c.coupon_number.in_(numbers)
        )
        return {number: resident for number, resident in await self.session.execute(stmt)}

    async def upsert_rows(self, rows: Sequence[Any]) -> None:
        if not rows:
            return
        values = [{c.name: getattr(r, c.name) for c in _coupons.columns} for r in rows]
        stmt = upsert(self.session, _coupons)
        stmt = stmt.on_conflict_do_update(
            index_elements=["municipality_code", "coupon_number"],
            set_={
                name: stmt.excluded[name]
                for name in ("sex", "birth_date", "invalid_from", "invalid_reason", "version", "updated_at")
            },
        )
        await self.session.execute(stmt, values)

    def add(self, coupon: Coupon) -> None:
        self.session.add(coupon)

    async def announce(self, events: Sequence[OutboxEvent]) -> None:
        await self._outbox.add(events)


class DirectoryRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def holders(self, municipality_code: str, hashes: Sequence[bytes]) -> dict[bytes, str]:
        """keyed hash → the resident of ``municipality_code`` registered with it, for those registered."""
        if not hashes:
            return {}
        stmt = select(_directory.c.my_number_hash, _directory.c.resident_id).where(
            _directory.c.municipality_code == municipality_code, _directory.c.my_number_hash.in_(hashes)
        )
        return {bytes(h): resident for h, resident in await self.session.execute(stmt)}

    async def entries(self, hashes: Sequence[bytes]) -> list[tuple[bytes, str, str]]:
        """(hash, municipality, resident id) of every municipality these numbers are or were registered in."""
        if not hashes:
            return []
        stmt = select(_directory.c.my_number_hash, _directory.c.municipality_code, _directory.c.resident_id).where(
            _directory.c.my_number_hash.in_(hashes)
        )
        return [(bytes(h), m, r) for h, m, r in await self.session.execute(stmt)]

    async def claim(self, entries: Sequence[tuple[bytes, str]], municipality_code: str) -> bool:
        """Point each hash at its resident unless another resident of the municipality holds it; False if
        one was held (nothing is repointed: the existing entry wins)."""
        now = utcnow()
        stmt = upsert(self.session, _directory)
        stmt = stmt.on_conflict_do_update(
            index_elements=["my_number_hash", "municipality_code"],
            set_={"updated_at": stmt.excluded.updated_at},
            where=_directory.c.resident_id == stmt.excluded.resident_id,
        )
        rows = [
            {"my_number_hash": h, "municipality_code": municipality_code, "resident_id": r, "updated_at": now}
            for h, r in entries
        ]
        await self.session.execute(stmt, rows)
        held = await self.holders(municipality_code, [h for h, _ in entries])
        return all(held.get(h) == r for h, r in entries)

    async def remove_many(self, hashes: Sequence[bytes], municipality_code: str) -> None:
        await self.session.execute(
            delete(_directory).where(
                _directory.c.municipality_code == municipality_code, _directory.c.my_number_hash.in_(hashes)
            )
        )

    async def put(self, my_number_hash: bytes, municipality_code: str, resident_id: str) -> None:
        await self.claim([(my_number_hash, resident_id)], municipality_code)

    async def remove(self, my_number_hash: bytes, municipality_code: str) -> None:
        entry = await self.session.get(MyNumberDirectoryEntry, (my_number_hash, municipality_code))
        if entry is not None:
            await self.session.delete(entry)


class ImportRepository:
    """resident imports in the main database: the file, the progress, the row errors."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def by_file(self, municipality_code: str, sha256: str) -> ResidentImport | None:
        stmt = select(ResidentImport).where(
            ResidentImport.municipality_code == municipality_code, ResidentImport.sha256 == sha256
        )
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def get(self, import_id: str, *, for_update: bool = False) -> ResidentImport | None:
        stmt = select(ResidentImport).where(ResidentImport.import_id == import_id)
        if for_update:
            stmt = stmt.with_for_update()
        return (await self.session.execute(stmt)).scalar_one_or_none()

    def add(self, entry: ResidentImport) -> None:
        self.session.add(entry)

    async def add_chunk(self, import_id: str, seq: int, data: bytes) -> None:
        await self.session.execute(insert(_import_chunks).values(import_id=import_id, seq=seq, data=data))

    async def chunk(self, import_id: str, seq: int) -> bytes | None:
        stmt = select(ResidentImportChunk.data).where(
            ResidentImportChunk.import_id == import_id, ResidentImportChunk.seq == seq
        )
        data = (await self.session.execute(stmt)).scalar_one_or_none()
        return None if data is None else bytes(data)

    async def drop_chunks(self, import_id: str) -> None:
        await self.session.execute(delete(ResidentImportChunk).where(ResidentImportChunk.import_id == import_id))

    async def unfinished(self) -> list[str]:
        stmt = (
            select(ResidentImport.import_id)
            .where(ResidentImport.status == "running")
            .order_by(ResidentImport.created_at)
        )
        return list((await self.session.execute(stmt)).scalars())

    async def add_errors(self, import_id: str, errors: Sequence[tuple[int, int, str, str]]) -> None:
        if errors:
            rows = [{"import_id": import_id, "row": r, "seq": s, "field": f, "message": m} for r, s, f, m in errors]
            await self.session.execute(insert(_import_errors), rows)

    async def errors(self, import_id: str, *, after_row: int, limit: int) -> list[ResidentImportError]:
        stmt = (
            select(ResidentImportError)
            .where(ResidentImportError.import_id == import_id, ResidentImportError.row > after_row)
            .order_by(ResidentImportError.row, ResidentImportError.seq)
            .limit(limit)
        )
        return list((await self.session.execute(stmt)).scalars())

    async def advance(self, import_id: str, *, values: dict[str, Any], at: datetime) -> None:
        await self.session.execute(
            update(ResidentImport).where(ResidentImport.import_id == import_id).values(**values, updated_at=at)
        )
