"""gateway tables: the audit log, and nothing else."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class MainBase(DeclarativeBase):
    metadata = MetaData()


class AuditEntry(MainBase):
    """One access to personal data (個人情報へのアクセス記録): who, what, why, when, and how it ended.

    Never a body and never a My Number. ``entry_hash`` chains each entry to the one before (see
    ``services/gateway/audit.py``); rows are only ever inserted.
    """

    __tablename__ = "audit_log"

    # Assigned by the writer, not the database: the chain order is the hash order, and a second writer
    # that races for the same number fails on the primary key instead of forking the chain.
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    request_id: Mapped[str] = mapped_column(Text)
    # who
    subject: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    municipality: Mapped[str | None] = mapped_column(String(6))
    institution: Mapped[str | None] = mapped_column(String(10))
    # what
    method: Mapped[str] = mapped_column(String(8))
    path_template: Mapped[str] = mapped_column(Text)
    resource_ids: Mapped[str] = mapped_column(Text)  # canonical JSON of the path's ids
    # why
    purpose: Mapped[str] = mapped_column(Text)
    # how it ended
    status: Mapped[int] = mapped_column(Integer)
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64), unique=True)
