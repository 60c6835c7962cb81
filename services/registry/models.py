"""registry tables. ``MainBase``: the main database; ``ShardBase``: every shard database."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.db import BY_AGE, shard_assignments_table
from shared.outbox import outbox_table
from shared.shardmove import (
    shard_captures_table,
    shard_fences_table,
    shard_move_changes_table,
    shard_moves_table,
)


class MainBase(DeclarativeBase):
    metadata = MetaData()


class ShardBase(DeclarativeBase):
    metadata = MetaData()


shard_assignments = shard_assignments_table(MainBase.metadata)
# Shard moves (``vrs shards move``): their progress in the main database, their fences in every shard.
shard_moves = shard_moves_table(MainBase.metadata)
shard_fences = shard_fences_table(ShardBase.metadata)
# While a municipality is pre-copied to another shard, the keys of its rows written meanwhile (triggers).
shard_captures = shard_captures_table(ShardBase.metadata)
shard_move_changes = shard_move_changes_table(ShardBase.metadata)


class MyNumberDirectoryEntry(MainBase):
    """Keyed hash of a My Number → where that person is (or was) registered: one row per municipality."""

    __tablename__ = "my_number_directory"

    my_number_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    municipality_code: Mapped[str] = mapped_column(String(6), primary_key=True)
    resident_id: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TransferDisclosure(MainBase):
    """情報提供等記録: one transfer lookup item that read another municipality's records of a person.

    Written in the lookup's own transaction, one row per (item, other municipality) for a person the caller may
    look up; a lookup that reads nothing (the person is not the caller's) writes nothing. The person is named by
    both municipalities' own resident ids, never by their My Number or its hash: each side reads its rows by
    its own id, and the rows outlive a rotation of the hash key.
    """

    __tablename__ = "transfer_disclosures"
    __table_args__ = (
        # One per direction: a resident's lookups made by its municipality, and those that read its records.
        Index("ix_transfer_disclosures_caller", "caller_municipality", "caller_resident_id", "disclosed_at"),
        Index("ix_transfer_disclosures_source", "source_municipality", "source_resident_id", "disclosed_at"),
        # And a municipality's whole log by period, newest first, paged by (time, id).
        Index("ix_transfer_disclosures_caller_time", "caller_municipality", "disclosed_at", "id"),
        Index("ix_transfer_disclosures_source_time", "source_municipality", "disclosed_at", "id"),
        # And the rows past their retention (services/registry/housekeeping.py), found by age.
        Index("ix_transfer_disclosures_age", "disclosed_at", **BY_AGE),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    disclosed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    request_id: Mapped[str] = mapped_column(String(128))  # X-Request-ID: the gateway's audit entry of the lookup
    caller_municipality: Mapped[str] = mapped_column(String(6))  # 情報照会者: who read
    caller_resident_id: Mapped[str] = mapped_column(String(64))
    source_municipality: Mapped[str] = mapped_column(String(6))  # 情報提供者: whose records were read
    source_resident_id: Mapped[str] = mapped_column(String(64))
    legal_basis: Mapped[str] = mapped_column(String(32))  # shared.grants.LegalBasis
    doses: Mapped[int] = mapped_column(Integer)  # shown from that municipality; 0: read, and nothing to show


class ResidentImport(MainBase):
    """One uploaded resident CSV and how far its import got; keyed for re-sends by (municipality, sha256).

    The file itself is in ``resident_import_chunks`` before the upload is answered, so an import survives a
    crash: a restarted registry resumes it after ``last_row``, the last row of the last committed batch.
    """

    __tablename__ = "resident_imports"
    __table_args__ = (
        UniqueConstraint("municipality_code", "sha256", name="uq_resident_imports_file"),
        Index("ix_resident_imports_status", "status"),
    )

    import_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    municipality_code: Mapped[str] = mapped_column(String(6))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))  # running, done
    submitted_by: Mapped[str] = mapped_column(String(128))  # the principal's scope key
    rows_total: Mapped[int] = mapped_column(Integer, default=0)
    rows_ok: Mapped[int] = mapped_column(Integer, default=0)
    rows_failed: Mapped[int] = mapped_column(Integer, default=0)
    last_row: Mapped[int] = mapped_column(Integer, default=1)  # every row up to this one is done (1: the header)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ResidentImportChunk(MainBase):
    """The uploaded file, in order, in pieces small enough for one statement each.

    The file holds My Numbers, so each piece is sealed as the residents' numbers are (AES-GCM under
    ``key_id``, the import id and the piece's number bound to it): the database, its WAL and its backups never
    hold them in the clear, however long an import keeps failing.
    """

    __tablename__ = "resident_import_chunks"

    import_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    # None only for a piece stored before pieces were sealed (migration 20261127_01): read as it is.
    key_id: Mapped[str | None] = mapped_column(String(32))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ResidentImportError(MainBase):
    """A bad row of an import: written with the progress of the batch it was met in."""

    __tablename__ = "resident_import_errors"

    import_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    row: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)  # a row may have several errors
    field: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)


class Resident(ShardBase):
    """接種者情報, keyed by the municipality's own person id (個別宛名番号)."""

    __tablename__ = "residents"
    __table_args__ = (UniqueConstraint("municipality_code", "coupon_number", name="uq_residents_coupon"),)

    municipality_code: Mapped[str] = mapped_column(String(6), primary_key=True)
    resident_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(Text)  # 氏名
    name_kana: Mapped[str] = mapped_column(Text)  # カナ
    birth_date: Mapped[date | None] = mapped_column(Date)  # 生年月日; may be unknown
    sex: Mapped[str] = mapped_column(String(1))  # M, F or U
    address: Mapped[str | None] = mapped_column(Text)
    coupon_number: Mapped[str | None] = mapped_column(String(10))  # 券番号
    my_number_key_id: Mapped[str | None] = mapped_column(String(32))
    my_number_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    my_number_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32))  # found through the directory
    my_number_last4: Mapped[str | None] = mapped_column(String(4))
    moved_to: Mapped[str | None] = mapped_column(String(6))
    moved_on: Mapped[date | None] = mapped_column(Date)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Coupon(ShardBase):
    """Every coupon (接種券) ever issued, with the state last announced on ``coupon-events``.

    A number stays with the resident it was issued to even after it stops being valid (reissued, moved out,
    voided), so it can never be handed to somebody else. ``version`` grows with every announced change.
    """

    __tablename__ = "coupons"
    __table_args__ = (Index("ix_coupons_resident", "municipality_code", "resident_id"),)

    municipality_code: Mapped[str] = mapped_column(String(6), primary_key=True)
    coupon_number: Mapped[str] = mapped_column(String(10), primary_key=True)  # 券番号
    resident_id: Mapped[str] = mapped_column(String(64))
    sex: Mapped[str] = mapped_column(String(1))  # the holder's, as last announced
    birth_date: Mapped[date | None] = mapped_column(Date)
    invalid_from: Mapped[date | None] = mapped_column(Date)
    invalid_reason: Mapped[str | None] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ResidentHistory(ShardBase):
    """Who changed what of a resident, and when: one row per version. ``changes`` maps a field to
    ``{"before", "after"}``; the My Number appears only as ``{"changed": true, "last4": ...}``."""

    __tablename__ = "resident_history"

    municipality_code: Mapped[str] = mapped_column(String(6), primary_key=True)
    resident_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    changed_by: Mapped[str] = mapped_column(String(128))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    changes: Mapped[dict[str, object]] = mapped_column(JSON)


# Coupon events written with the change they describe; the relay publishes them to ``coupon-events``.
outbox = outbox_table(ShardBase.metadata)


class IssuedCertificate(MainBase):
    """A 接種証明書 / SMART Health Card issued, and the dose versions it shows.

    In the main database, not a shard: a verifier holds only the card's ``rid`` and the revocation list is
    one per signing key, both across every municipality. No name is stored here.
    """

    __tablename__ = "issued_certificates"
    __table_args__ = (
        Index("ix_issued_certificates_resident", "municipality_code", "resident_id"),
        Index("ix_issued_certificates_revoked", "kid", "revoked_at"),
    )

    certificate_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    municipality_code: Mapped[str] = mapped_column(String(6))
    resident_id: Mapped[str] = mapped_column(String(64))
    kid: Mapped[str] = mapped_column(String(64))  # the signing key's thumbprint
    rid: Mapped[str] = mapped_column(String(24), unique=True)
    # [{"dose_id", "version"}, ...] in card order: a card is stale once records' doses differ from this.
    doses: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # SHA-256 of the name and birth date on the card: correcting either also makes the card stale.
    subject_digest: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # the card's nbf
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_reason: Mapped[str | None] = mapped_column(String(200))
