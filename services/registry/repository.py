"""All of registry's SQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from operator import attrgetter, itemgetter
from typing import Any, Literal

import asyncpg  # type: ignore[import-untyped]
from pydantic_core import to_json
from sqlalchemy import (
    ARRAY,
    JSON,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from services.registry import bulk
from services.registry.models import (
    Coupon,
    IssuedCertificate,
    MyNumberDirectoryEntry,
    Resident,
    ResidentHistory,
    ResidentImport,
    ResidentImportChunk,
    ResidentImportError,
    TransferDisclosure,
    outbox,
    shard_fences,
)
from shared.db import delete_older, take_turn, upsert, upsert_many, utcnow
from shared.errors import Conflict
from shared.outbox import OutboxEvent, OutboxRepository
from shared.shardmove import MovableTable


def _is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _one_of(session: AsyncSession, column: Any, values: Sequence[Any]) -> Any:
    """``column IN values``. On PostgreSQL ``IN (SELECT unnest(:array))``: one bind parameter instead of a
    thousand (SQLAlchemy renders them one by one, 60 ms a batch), and a semi-join the planner can hash —
    ``= ANY(:array)`` becomes a filter comparing every row with every value when a freshly loaded table has
    no statistics yet (0.4 s a batch on 3,000 rows)."""
    if _is_postgres(session):
        return column.in_(select(func.unnest(bindparam(None, list(values), type_=ARRAY(column.type)))))
    return column.in_(values)


async def _bulk_upsert(
    session: AsyncSession,
    table: Table,
    records: Sequence[tuple[Any, ...]],
    *,
    keys: Sequence[str],
    update: Sequence[str],
    where: str | None = None,
) -> None:
    """Insert or update ``records`` (tuples in ``table.columns`` order) in one go: on PostgreSQL ``COPY`` into a
    temporary staging table and one ``INSERT … SELECT … ON CONFLICT``, in the session's transaction; elsewhere
    an executemany."""
    if not records:
        return
    columns = [c.name for c in table.columns]
    if not _is_postgres(session):
        stmt = upsert(session, table)
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys),
            set_={name: stmt.excluded[name] for name in update},
            where=text(where.replace("EXCLUDED.", "excluded.")) if where else None,
        )
        await session.execute(stmt, [dict(zip(columns, r, strict=True)) for r in records])
        return
    raw = await _driver(session)
    stage = f"stage_{table.name}"
    await raw.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table.name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    await raw.copy_records_to_table(stage, records=_copyable(table, records), columns=columns)
    names = ", ".join(columns)
    assignments = ", ".join(f"{c} = EXCLUDED.{c}" for c in update)
    condition = f" WHERE {where}" if where else ""
    await raw.execute(
        f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {stage} "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {assignments}{condition}; TRUNCATE {stage}"
    )


async def copy_text(
    session: AsyncSession, table: str, columns: Sequence[str], data: bytes, *, binary: bool = False
) -> None:
    """``COPY table (columns) FROM STDIN`` of ready text-format lines (or a ``binary`` COPY's data), in the
    session's transaction (PostgreSQL). A key already there (a writer got in between the caller's check and
    this) is a :class:`Conflict`."""
    if not data:
        return
    raw = await _driver(session)
    try:
        await raw.copy_to_table(table, source=_once(data), columns=list(columns), format="binary" if binary else "text")
    except asyncpg.UniqueViolationError:
        raise Conflict(f"{table}: a row of this batch was written meanwhile") from None


async def _once(data: bytes) -> AsyncIterator[bytes]:
    # An async iterable: asyncpg reads a file-like source in a thread, 512 KiB at a time.
    yield data


async def _driver(session: AsyncSession) -> Any:
    """The asyncpg connection under the session, inside the session's transaction."""
    raw = (await (await session.connection()).get_raw_connection()).driver_connection
    assert raw is not None
    return raw


def _copyable(table: Table, records: Sequence[tuple[Any, ...]]) -> Sequence[tuple[Any, ...]]:
    """``records`` as ``COPY`` takes them: JSON columns as text (asyncpg sends ``json`` as text)."""
    json_at = [i for i, c in enumerate(table.columns) if isinstance(c.type, JSON)]
    if not json_at:
        return records
    out = []
    for record in records:
        values = list(record)
        for i in json_at:
            values[i] = to_json(values[i]).decode()
        out.append(tuple(values))
    return out


def _tuples(table: Table, rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """Mappings as tuples in ``table.columns`` order (C-speed ``itemgetter``, no per-row Python loop)."""
    get = itemgetter(*[c.name for c in table.columns])
    return list(map(get, rows))


_residents: Table = Resident.__table__  # type: ignore[assignment]
_coupons: Table = Coupon.__table__  # type: ignore[assignment]
_directory: Table = MyNumberDirectoryEntry.__table__  # type: ignore[assignment]
_history: Table = ResidentHistory.__table__  # type: ignore[assignment]
_import_chunks: Table = ResidentImportChunk.__table__  # type: ignore[assignment]
_import_errors: Table = ResidentImportError.__table__  # type: ignore[assignment]
_disclosures: Table = TransferDisclosure.__table__  # type: ignore[assignment]


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
        if rows and _is_postgres(self.session):
            raw = await _driver(self.session)
            columns = [c.name for c in _history.columns]
            records = _copyable(_history, _tuples(_history, rows))
            await raw.copy_records_to_table(_history.name, records=records, columns=columns)
        elif rows:
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
            .where(
                _residents.c.municipality_code == municipality_code,
                _one_of(self.session, _residents.c.resident_id, resident_ids),
            )
            .with_for_update()
        )
        return {row.resident_id: dict(row._mapping) for row in await self.session.execute(stmt)}

    async def known(self, municipality_code: str, resident_ids: Sequence[str]) -> set[str]:
        """Those of ``resident_ids`` stored in this municipality (moved out or not)."""
        if not resident_ids:
            return set()
        stmt = select(_residents.c.resident_id).where(
            _residents.c.municipality_code == municipality_code,
            _one_of(self.session, _residents.c.resident_id, resident_ids),
        )
        return set((await self.session.execute(stmt)).scalars())

    async def copy_new(self, residents: bytes, coupons: bytes, history: bytes, events: bytes) -> None:
        """Residents seen for the first time, with their coupons, first history entries and coupon events, as
        prepared COPY lines (the events' in binary) (:mod:`services.registry.bulk`); no staging table, no upsert."""
        await copy_text(self.session, _residents.name, bulk.RESIDENT_COLUMNS, residents)
        await copy_text(self.session, _coupons.name, bulk.COUPON_COLUMNS, coupons)
        await copy_text(self.session, _history.name, bulk.HISTORY_COLUMNS, history)
        await copy_text(self.session, outbox.name, bulk.OUTBOX_COLUMNS, events, binary=True)

    async def present(self, municipality_code: str, resident_ids: Sequence[str]) -> set[str]:
        """Those of ``resident_ids`` registered here and not moved out."""
        if not resident_ids:
            return set()
        stmt = select(_residents.c.resident_id).where(
            _residents.c.municipality_code == municipality_code,
            _one_of(self.session, _residents.c.resident_id, resident_ids),
            _residents.c.moved_on.is_(None),
        )
        return set((await self.session.execute(stmt)).scalars())

    async def upsert_many(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or replace whole resident rows in one go."""
        keep = {"municipality_code", "resident_id", "created_at"}
        update = [c.name for c in _residents.columns if c.name not in keep]
        records = _tuples(_residents, rows)
        await _bulk_upsert(self.session, _residents, records, keys=["municipality_code", "resident_id"], update=update)

    async def flush(self) -> None:
        await self.session.flush()

    async def refresh_statistics(self) -> None:
        """``ANALYZE`` after a bulk import (PostgreSQL): look-ups right after it (a batch of transfer look-ups
        joining 1,000 keys) are otherwise planned on the statistics of the empty tables."""
        if _is_postgres(self.session):
            await self.session.execute(text(f"ANALYZE {_residents.name}, {_coupons.name}"))

    async def sealed_under_other_keys(self, active_key: str, limit: int) -> list[Any]:
        """Residents whose My Number is sealed under another key than ``active_key``, locked; rows another
        rotation (or a request) holds are skipped, not waited for, and so are municipalities moving between
        shards (their rows may not change there; a later run re-seals them where they landed)."""
        stmt = (
            select(_residents.c.municipality_code, _residents.c.resident_id, _residents.c.my_number_key_id)
            .add_columns(_residents.c.my_number_ciphertext)
            .where(_residents.c.my_number_key_id.is_not(None), _residents.c.my_number_key_id != active_key)
            .where(~exists().where(shard_fences.c.municipality_code == _residents.c.municipality_code))
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list(await self.session.execute(stmt))

    async def reseal(self, rows: Sequence[dict[str, Any]]) -> None:
        stmt = (
            update(_residents)
            .where(
                _residents.c.municipality_code == bindparam("m"),
                _residents.c.resident_id == bindparam("r"),
                _residents.c.my_number_key_id == bindparam("old"),
            )
            .values(my_number_key_id=bindparam("kid"), my_number_ciphertext=bindparam("blob"))
        )
        await self.session.execute(stmt, list(rows))

    async def key_counts(self) -> dict[str, int]:
        stmt = (
            select(_residents.c.my_number_key_id, func.count())
            .where(_residents.c.my_number_key_id.is_not(None))
            .group_by(_residents.c.my_number_key_id)
        )
        return {kid: int(n) for kid, n in await self.session.execute(stmt)}


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
            .where(
                _coupons.c.municipality_code == municipality_code,
                _one_of(self.session, _coupons.c.resident_id, resident_ids),
            )
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
            _coupons.c.municipality_code == municipality_code, _one_of(self.session, _coupons.c.coupon_number, numbers)
        )
        return {number: resident for number, resident in await self.session.execute(stmt)}

    async def upsert_rows(self, rows: Sequence[Any]) -> None:
        values = list(map(attrgetter(*[c.name for c in _coupons.columns]), rows))
        update = ["sex", "birth_date", "invalid_from", "invalid_reason", "version", "updated_at"]
        await _bulk_upsert(self.session, _coupons, values, keys=["municipality_code", "coupon_number"], update=update)

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
            _directory.c.municipality_code == municipality_code,
            _one_of(self.session, _directory.c.my_number_hash, hashes),
        )
        return {bytes(h): resident for h, resident in await self.session.execute(stmt)}

    async def entries(self, hashes: Sequence[bytes]) -> list[tuple[bytes, str, str]]:
        """(hash, municipality, resident id) of every municipality these numbers are or were registered in."""
        if not hashes:
            return []
        stmt = select(_directory.c.my_number_hash, _directory.c.municipality_code, _directory.c.resident_id).where(
            _one_of(self.session, _directory.c.my_number_hash, hashes)
        )
        return [(bytes(h), m, r) for h, m, r in await self.session.execute(stmt)]

    async def claim(self, entries: Sequence[tuple[bytes, str]], municipality_code: str) -> bool:
        """Point each hash at its resident unless another resident of the municipality holds it; False if
        one was held (nothing is repointed: the existing entry wins)."""
        now = utcnow()
        # In ``_directory.columns`` order: my_number_hash, municipality_code, resident_id, updated_at.
        rows = [(h, municipality_code, r, now) for h, r in entries]
        await _bulk_upsert(
            self.session,
            _directory,
            rows,
            keys=["my_number_hash", "municipality_code"],
            update=["updated_at"],
            where=f"{_directory.name}.resident_id = EXCLUDED.resident_id",
        )
        held = await self.holders(municipality_code, [h for h, _ in entries])
        return all(held.get(h) == r for h, r in entries)

    async def copy_new(self, entries: bytes) -> None:
        """Directory entries of numbers nobody of the municipality holds, as prepared COPY lines."""
        await copy_text(self.session, _directory.name, bulk.DIRECTORY_COLUMNS, entries)

    async def remove_many(self, hashes: Sequence[bytes], municipality_code: str) -> None:
        await self.session.execute(
            delete(_directory).where(
                _directory.c.municipality_code == municipality_code,
                _one_of(self.session, _directory.c.my_number_hash, hashes),
            )
        )

    async def refresh_statistics(self) -> None:
        if _is_postgres(self.session):
            await self.session.execute(text(f"ANALYZE {_directory.name}"))

    async def put(self, my_number_hash: bytes, municipality_code: str, resident_id: str) -> None:
        await self.claim([(my_number_hash, resident_id)], municipality_code)

    async def remove(self, my_number_hash: bytes, municipality_code: str) -> None:
        entry = await self.session.get(MyNumberDirectoryEntry, (my_number_hash, municipality_code))
        if entry is not None:
            await self.session.delete(entry)


# What a lookup item disclosed, per other municipality: the columns that differ between the rows of one lookup.
DISCLOSED = ("caller_resident_id", "source_municipality", "source_resident_id", "legal_basis", "doses")


class DisclosureRepository:
    """The transfer disclosure log (情報提供等記録), in registry's main database."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def record(
        self, rows: Sequence[tuple[str, str, str, str, int]], *, at: datetime, request_id: str, caller: str
    ) -> None:
        """One lookup's disclosures (tuples in :data:`DISCLOSED` order), in one statement whatever their number
        (:func:`shared.db.upsert_many`: one array per column on PostgreSQL)."""
        if not rows:
            return
        shared = {"disclosed_at": at, "request_id": request_id, "caller_municipality": caller}
        stmt, params = upsert_many(
            self.session, _disclosures, [shared | dict(zip(DISCLOSED, row, strict=True)) for row in rows]
        )
        await self.session.execute(stmt, params)

    async def of_resident(
        self,
        municipality_code: str,
        resident_id: str,
        *,
        since: datetime | None,
        until: datetime | None,
        limit: int,
    ) -> list[TransferDisclosure]:
        """The lookups ``municipality_code`` made about its resident and those that read its records of them,
        newest first; ``since`` inclusive, ``until`` exclusive."""
        d = TransferDisclosure
        stmt = select(d).where(
            or_(
                and_(d.caller_municipality == municipality_code, d.caller_resident_id == resident_id),
                and_(d.source_municipality == municipality_code, d.source_resident_id == resident_id),
            )
        )
        return await self._newest(stmt, since=since, until=until, limit=limit)

    async def of_municipality(
        self,
        municipality_code: str,
        *,
        directions: Sequence[Literal["received", "provided"]],
        since: datetime | None,
        until: datetime | None,
        before: tuple[datetime, int] | None,
        limit: int,
    ) -> list[TransferDisclosure]:
        """The lookups ``municipality_code`` made (received) and those that read its records (provided), newest
        first from just before the position ``before`` (a row's time and id). One read per direction, each in its
        index's order and as long as a page, merged: never a sort of the whole period."""
        d = TransferDisclosure
        rows: list[TransferDisclosure] = []
        for direction in directions:
            column = d.caller_municipality if direction == "received" else d.source_municipality
            stmt = select(d).where(column == municipality_code)
            if before is not None:
                at, row_id = before
                stmt = stmt.where(tuple_(d.disclosed_at, d.id) < tuple_(literal(at, d.disclosed_at.type), row_id))
            rows += await self._newest(stmt, since=since, until=until, limit=limit)
        return sorted(rows, key=lambda row: (row.disclosed_at, row.id), reverse=True)[:limit]

    async def position(self, municipality_code: str, disclosure_id: int) -> tuple[datetime, int] | None:
        """Where a row of ``municipality_code``'s log stands in its order (None: not one of its rows)."""
        d = TransferDisclosure
        at = await self.session.scalar(
            select(d.disclosed_at).where(
                d.id == disclosure_id,
                or_(d.caller_municipality == municipality_code, d.source_municipality == municipality_code),
            )
        )
        return None if at is None else (at, disclosure_id)

    async def _newest(
        self, stmt: Select[TransferDisclosure], *, since: datetime | None, until: datetime | None, limit: int
    ) -> list[TransferDisclosure]:
        """``stmt``'s rows in the period (``since`` inclusive, ``until`` exclusive), newest first."""
        d = TransferDisclosure
        if since is not None:
            stmt = stmt.where(d.disclosed_at >= since)
        if until is not None:
            stmt = stmt.where(d.disclosed_at < until)
        stmt = stmt.order_by(d.disclosed_at.desc(), d.id.desc()).limit(limit)
        return list((await self.session.execute(stmt)).scalars())

    async def delete_disclosed_before(self, before: datetime, *, limit: int) -> int:
        """Delete up to ``limit`` rows disclosed before ``before`` (past their retention); how many."""
        d: Table = TransferDisclosure.__table__  # type: ignore[assignment]
        stmt = delete_older(d, d.c.disclosed_at, before, limit=limit, dialect=self.session.get_bind().dialect.name)
        return int((await self.session.execute(stmt)).rowcount)  # type: ignore[attr-defined]


# Arbitrary but fixed: the advisory lock key of the certificate revocation sweep ("VRSCERTS" in ASCII).
_SWEEP_LOCK = 0x5652534345525453


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

    async def unrevoked_after(self, after: str, *, limit: int) -> list[tuple[str, str, list[dict[str, Any]]]]:
        """(certificate id, municipality, doses shown) of certificates not revoked, by id after ``after``:
        the sweep's keyset pages, columns only."""
        stmt = (
            select(IssuedCertificate.certificate_id, IssuedCertificate.municipality_code, IssuedCertificate.doses)
            .where(IssuedCertificate.revoked_at.is_(None), IssuedCertificate.certificate_id > after)
            .order_by(IssuedCertificate.certificate_id)
            .limit(limit)
        )
        return [(r.certificate_id, r.municipality_code, r.doses) for r in await self.session.execute(stmt)]

    async def take_sweep_lock(self) -> bool:
        """Whether this transaction may run the revocation sweep: on PostgreSQL a transaction-scoped advisory
        lock, so that of several registry replicas one sweeps at a time; SQLite is one process anyway."""
        return await take_turn(self.session, _SWEEP_LOCK)

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

    async def add_chunk(self, import_id: str, seq: int, key_id: str, data: bytes) -> None:
        await self.session.execute(
            insert(_import_chunks).values(import_id=import_id, seq=seq, key_id=key_id, data=data)
        )

    async def chunk(self, import_id: str, seq: int) -> tuple[str | None, bytes] | None:
        """(key id, sealed piece), or None past the file's end."""
        stmt = select(ResidentImportChunk.key_id, ResidentImportChunk.data).where(
            ResidentImportChunk.import_id == import_id, ResidentImportChunk.seq == seq
        )
        row = (await self.session.execute(stmt)).one_or_none()
        return None if row is None else (row.key_id, bytes(row.data))

    async def chunks_under_other_keys(self, active_key: str, limit: int) -> list[Any]:
        """Pieces of unfinished uploads sealed under another key than ``active_key`` (or not sealed), locked."""
        stmt = (
            select(_import_chunks.c.import_id, _import_chunks.c.seq, _import_chunks.c.key_id, _import_chunks.c.data)
            .where(or_(_import_chunks.c.key_id.is_(None), _import_chunks.c.key_id != active_key))
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list(await self.session.execute(stmt))

    async def reseal_chunk(self, import_id: str, seq: int, *, key_id: str, data: bytes) -> None:
        await self.session.execute(
            update(_import_chunks)
            .where(_import_chunks.c.import_id == import_id, _import_chunks.c.seq == seq)
            .values(key_id=key_id, data=data)
        )

    async def chunk_key_counts(self) -> dict[str | None, int]:
        stmt = select(_import_chunks.c.key_id, func.count()).group_by(_import_chunks.c.key_id)
        return {kid: int(n) for kid, n in await self.session.execute(stmt)}

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


# What a shard move (``vrs shards move``, shared/shardmove.py) carries of a municipality, in copy order; ``$1`` is
# its code. Unpublished coupon events move with it (published ones are history, on the topic).
MOVABLE_TABLES = (
    MovableTable(Resident.__table__, "municipality_code = $1", captured=True),  # type: ignore[arg-type]
    MovableTable(Coupon.__table__, "municipality_code = $1", captured=True),  # type: ignore[arg-type]
    MovableTable(ResidentHistory.__table__, "municipality_code = $1", captured=True),  # type: ignore[arg-type]
    MovableTable(
        outbox,
        "key = $1",
        copy_where="key = $1 AND published_at IS NULL",
        skip=("id",),
        order_by="id",
        key=("event_id",),
        captured=True,
    ),
)
