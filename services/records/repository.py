"""All of records' SQL."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, Table, bindparam, insert, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from services.records.models import CouponProjection, Dose, DoseHistory, IdempotencyClaim, IdempotencyKey
from shared.db import Database, upsert

_doses: Table = Dose.__table__  # type: ignore[assignment]
_keys: Table = IdempotencyKey.__table__  # type: ignore[assignment]
_claims: Table = IdempotencyClaim.__table__  # type: ignore[assignment]
_coupons: Table = CouponProjection.__table__  # type: ignore[assignment]
# unnest keeps the array's order, so the locks are taken in the sorted order given.
_LOCK_COUPONS = text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(:keys) AS k").bindparams(
    bindparam("keys", type_=postgresql.ARRAY(postgresql.BIGINT))
)


def coupon_lock_key(municipality_code: str, coupon_number: str) -> int:
    """A coupon's advisory-lock key: a signed 64-bit hash (two coupons sharing one only wait on each other)."""
    digest = hashlib.blake2b(f"records-coupon:{municipality_code}:{coupon_number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _dialect_insert(dialect: str, table: Table) -> Any:
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


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

    async def lock_coupons(self, coupons: Sequence[tuple[str, str]]) -> None:
        """Take a transaction-scoped lock per coupon, in one fixed order (no deadlock between two batches).

        Whoever records a dose of a coupon holds its lock from before it reads the coupon's doses until it
        commits, so two requests for the same coupon cannot both decide on a view without the other's dose:
        the second reads the first's dose and answers ``duplicate`` or ``needs_review``. SQLite has one
        writer per database and no advisory locks; there this is a no-op.
        """
        if not coupons or self.session.get_bind().dialect.name != "postgresql":
            return
        keys = sorted({coupon_lock_key(m, c) for m, c in coupons})
        await self.session.execute(_LOCK_COUPONS, {"keys": keys})

    async def live_of_coupons(self, coupons: Sequence[tuple[str, str]]) -> list[Row[Any]]:
        """What the rules compare a new dose with: the coupons' doses not voided, oldest first (Core rows)."""
        if not coupons:
            return []
        d = _doses
        stmt = (
            select(
                d.c.dose_id, d.c.municipality_code, d.c.coupon_number, d.c.coupon_line, d.c.dose_number,
                d.c.vaccinated_on, d.c.vaccine, d.c.lot_number,
            )
            .where(tuple_(d.c.municipality_code, d.c.coupon_number).in_(coupons), d.c.voided.is_(False))
            .order_by(d.c.dose_number, d.c.vaccinated_on, d.c.recorded_at)
        )  # fmt: skip
        return list(await self.session.execute(stmt))

    async def insert_many(self, rows: Sequence[dict[str, Any]]) -> None:
        """New doses, one statement."""
        if rows:
            await self.session.execute(insert(_doses), list(rows))

    def add(self, dose: Dose) -> None:
        self.session.add(dose)

    def add_history(self, entry: DoseHistory) -> None:
        self.session.add(entry)


class IdempotencyRepository:
    """The answers given, per caller and key, beside the doses they recorded (shard-local)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, scope: str, key: str) -> IdempotencyKey | None:
        return await self.session.get(IdempotencyKey, (scope, key), populate_existing=True)

    async def answers(self, scope: str, keys: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """``key → (request hash, answer)`` of the keys already answered; one statement."""
        t = _keys
        stmt = select(t.c.key, t.c.request_hash, t.c.response).where(t.c.scope == scope, t.c.key.in_(keys))
        return {row.key: (row.request_hash, row.response) for row in await self.session.execute(stmt)}

    async def claim(self, rows: Sequence[dict[str, Any]]) -> set[str]:
        """Insert the keys in one statement; returns those that were new. A concurrent claim of the same key
        waits here on PostgreSQL until the other transaction ends, so the loser then replays the winner."""
        if not rows:
            return set()
        stmt = (
            upsert(self.session, _keys).on_conflict_do_nothing(index_elements=["scope", "key"]).returning(_keys.c.key)
        )
        return set((await self.session.execute(stmt.values(list(rows)))).scalars())


class ClaimRepository:
    """Idempotency keys claimed in records' main database, one per caller and key across all shards."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def claim(self, rows: Sequence[dict[str, Any]]) -> dict[str, str]:
        """Claim the keys; returns ``key → request hash`` as stored (the first body a key came with).

        One autocommitted statement, not a part of the request's transaction: a claim only binds a key to its
        first body (what a later body is compared with), and a claim whose dose was then rolled back is
        harmless — the retry with the same body finds its own claim and records the dose. It spares the
        dose path a second transaction (BEGIN and COMMIT) in the main database. Keys are inserted in a
        fixed order, so concurrent batches cannot deadlock; a key claimed by someone else is read back.
        """
        if not rows:
            return {}
        t = _claims
        ordered = sorted(rows, key=lambda r: str(r["key"]))
        async with self.database.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            insert_stmt = _dialect_insert(conn.dialect.name, t).values(ordered)
            stmt = insert_stmt.on_conflict_do_nothing(index_elements=["scope", "key"]).returning(
                t.c.key, t.c.request_hash
            )
            claimed = {row.key: row.request_hash for row in await conn.execute(stmt)}
            missing = [r["key"] for r in rows if r["key"] not in claimed]
            if missing:
                found = select(t.c.key, t.c.request_hash).where(t.c.scope == rows[0]["scope"], t.c.key.in_(missing))
                claimed |= {row.key: row.request_hash for row in await conn.execute(found)}
        return claimed


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

    async def holders(self, coupons: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        """What the dose path needs of these coupons' projection (Core rows, no ORM objects)."""
        if not coupons:
            return {}
        c = _coupons
        stmt = select(
            c.c.municipality_code, c.c.coupon_number, c.c.resident_id, c.c.sex, c.c.birth_date, c.c.invalid_from,
            c.c.invalid_reason,
        ).where(tuple_(c.c.municipality_code, c.c.coupon_number).in_(coupons))  # fmt: skip
        return {(r.municipality_code, r.coupon_number): r for r in await self.session.execute(stmt)}

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
