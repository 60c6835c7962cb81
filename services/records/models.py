"""records tables. ``MainBase``: the main database (shard map); ``ShardBase``: every shard."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.consumer import consumer_tables
from shared.db import BY_AGE, shard_assignments_table
from shared.outbox import outbox_table
from shared.shardmove import shard_fences_table, shard_moves_table


class MainBase(DeclarativeBase):
    metadata = MetaData()


class ShardBase(DeclarativeBase):
    metadata = MetaData()


shard_assignments = shard_assignments_table(MainBase.metadata)
# Shard moves (``vrs shards move``): their progress in the main database, their fences in every shard.
shard_moves = shard_moves_table(MainBase.metadata)
shard_fences = shard_fences_table(ShardBase.metadata)


class IdempotencyClaim(MainBase):
    """An idempotency key as the caller sees it: one per caller, whatever the shard.

    Claimed in the main database before the dose is written, so the same key sent again with another
    municipality's coupon (another shard) is recognised as a different request (409), not recorded again.
    The answer itself is kept beside the dose, in the shard (:class:`IdempotencyKey`).
    """

    __tablename__ = "idempotency_claims"
    # Claims expire (services/records/housekeeping.py), found by age.
    __table_args__ = (Index("ix_idempotency_claims_created", "created_at", **BY_AGE),)

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    shard: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DoseImport(MainBase):
    """A dose CSV uploaded for background processing: the file itself (stored before the 202, so a restart
    resumes it), who sent it, and how far it got. Rows go through the batch path in chunks; ``next_row`` is
    the first data row not yet recorded, and a chunk replayed after a crash only replays its keys' answers."""

    __tablename__ = "dose_imports"
    __table_args__ = (Index("ix_dose_imports_unfinished", "finished_at", "lease_until"),)

    import_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    scope: Mapped[str] = mapped_column(String(80))  # the principal's scope key: only it may read the status
    principal: Mapped[dict[str, Any]] = mapped_column(JSON)  # recorded as this principal, as a batch would be
    content: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16))  # queued, processing, done (shown as running/done)
    next_row: Mapped[int] = mapped_column(Integer)  # file row number (the header is row 1)
    rows_total: Mapped[int] = mapped_column(Integer)
    rows_ok: Mapped[int] = mapped_column(Integer)
    rows_failed: Mapped[int] = mapped_column(Integer)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{"row","field","message"}], the first 1,000
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # a worker is on it until then
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Dose(ShardBase):
    """One dose (接種記録) as recorded, with the statistics cell it currently counts in."""

    __tablename__ = "doses"
    __table_args__ = (
        Index("ix_doses_coupon", "municipality_code", "coupon_number"),
        # Led by status: an index led by municipality_code alone would tie with ix_doses_coupon for a lookup by
        # coupon while the table has no statistics yet, and a plan cached then scans a municipality per coupon.
        Index("ix_doses_review", "status", "municipality_code"),
    )

    dose_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    municipality_code: Mapped[str] = mapped_column(String(6))  # 接種券を発行した自治体
    coupon_number: Mapped[str] = mapped_column(String(10))  # 券番号
    coupon_line: Mapped[str] = mapped_column(String(18))  # the whole line as read, for review
    dose_number: Mapped[int] = mapped_column(Integer)  # 接種回数
    vaccinated_on: Mapped[date] = mapped_column(Date)  # 接種日
    vaccine: Mapped[str] = mapped_column(String(32))  # product code (ワクチンメーカー)
    lot_number: Mapped[str] = mapped_column(String(20))  # ロット番号
    venue: Mapped[str | None] = mapped_column(String(30))  # 接種会場名
    doctor: Mapped[str | None] = mapped_column(String(20))  # 接種医師名
    medical_worker: Mapped[bool] = mapped_column(Boolean)  # the person is a 医療従事者等
    status: Mapped[str] = mapped_column(String(16))
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    rules_version: Mapped[str] = mapped_column(String(32))
    # Filled when a registered resident holds the coupon; sex/age band then come from the registry.
    resident_id: Mapped[str | None] = mapped_column(String(64))
    sex: Mapped[str] = mapped_column(String(1))
    age_band: Mapped[str] = mapped_column(String(3))
    # 0-9 … 90- or UNK; UNK for doses recorded before the column existed, as their events said (none).
    age_band_10: Mapped[str] = mapped_column(String(5), server_default="UNK")
    voided: Mapped[bool] = mapped_column(Boolean, default=False)
    recorded_by: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(Integer, default=1)


class IdempotencyKey(ShardBase):
    """A request already answered: the same key from the same organisation gets the same answer."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created", "created_at", **BY_AGE),)  # as the claims'

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)  # e.g. institution:1311234567
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    dose_id: Mapped[str] = mapped_column(String(36))
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DoseHistory(ShardBase):
    """Every change to a dose after it was recorded: who, why, and the state before."""

    __tablename__ = "dose_history"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    dose_id: Mapped[str] = mapped_column(String(36), index=True)
    version: Mapped[int] = mapped_column(Integer)
    change: Mapped[str] = mapped_column(String(16))  # corrected, voided, matched
    reason: Mapped[str] = mapped_column(Text)
    changed_by: Mapped[str] = mapped_column(String(64))
    before: Mapped[dict[str, Any]] = mapped_column(JSON)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CouponProjection(ShardBase):
    """records' own view of registry's coupons, fed by ``coupon-events``: who holds a coupon (only what the
    statistics cell needs) and until when it is valid. The dose hot path reads this and asks no service."""

    __tablename__ = "coupons"

    municipality_code: Mapped[str] = mapped_column(String(6), primary_key=True)
    coupon_number: Mapped[str] = mapped_column(String(10), primary_key=True)
    resident_id: Mapped[str] = mapped_column(String(64))
    sex: Mapped[str] = mapped_column(String(1))
    birth_date: Mapped[date | None] = mapped_column(Date)
    invalid_from: Mapped[date | None] = mapped_column(Date)
    invalid_reason: Mapped[str | None] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)  # the coupon event's; an older or repeated event is ignored
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# Dose events written with the change they describe; the relay publishes them to ``dose-events``.
outbox = outbox_table(ShardBase.metadata)
# The coupon consumer's bookkeeping, per shard: each shard applies the coupon events of its municipalities
# with their ids and the offsets in the same transaction.
consumer_bookkeeping = consumer_tables(ShardBase.metadata)
