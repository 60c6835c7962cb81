"""gateway tables: the audit trail and where retention cut its chains, and nothing else."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class MainBase(DeclarativeBase):
    metadata = MetaData()


class AuditEntry(MainBase):
    """One access to personal data (個人情報へのアクセス記録): who, what, on what grounds, when, and how it ended.

    Never a body and never a My Number. Each gateway instance appends its own chain (``instance``, ``seq``
    from 1); ``mac`` keys each entry to the one before it (see ``services/gateway/audit.py``). Rows are only
    ever inserted, and deleted from the front of their chain once past their years (:class:`AuditCut`).
    """

    __tablename__ = "audit_trail"
    __table_args__ = (
        Index("ix_audit_trail_municipality_time", "municipality", "recorded_at"),
        Index("ix_audit_trail_caller_municipality_time", "caller_municipality", "recorded_at"),
    )

    instance: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Assigned by the instance's writer, not the database: the chain order is the MAC order.
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    request_id: Mapped[str] = mapped_column(Text)
    # who
    principal: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    caller_municipality: Mapped[str | None] = mapped_column(String(6))
    institution: Mapped[str | None] = mapped_column(String(10))
    # whose data: the municipality in the path
    municipality: Mapped[str | None] = mapped_column(String(6))
    # what
    action: Mapped[str] = mapped_column(Text)  # "<METHOD> <path template>"
    resource: Mapped[str] = mapped_column(Text)  # the path with its ids, My Numbers masked
    # on what grounds: one of services.gateway.audit.LegalBasis
    legal_basis: Mapped[str] = mapped_column(String(32))
    # how it ended: the HTTP status the caller got. NULL in an *intent* entry, written before the request is
    # forwarded; its *outcome* entry follows later in the same chain and names it by ``intent_seq``.
    outcome: Mapped[int | None] = mapped_column(Integer)
    intent_seq: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    prev_mac: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))


class AuditCut(MainBase):
    """Where retention cut a chain: its entries up to ``seq`` were deleted, ``mac`` being the last one's (the next
    entry's ``prev_mac``), at ``cut_at``, as older than ``kept_since``. ``cut_mac`` keys the row with the audit key
    (``services/gateway/audit.py``), so nobody without it can move a cut to hide entries deleted past it."""

    __tablename__ = "audit_cuts"

    instance: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    mac: Mapped[str] = mapped_column(String(64))
    kept_since: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    cut_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    cut_mac: Mapped[str] = mapped_column(String(64))
