"""idempotency claims expire; a finished dose import keeps no file

Claims older than ``VRS_RECORDS_IDEMPOTENCY_KEEP_DAYS`` are deleted (services/records/housekeeping.py), found by
age through a BRIN index: a few pages for the whole table, rarely touched by an insert at its end. Built
``CONCURRENTLY`` on PostgreSQL, so doses keep being claimed while it is (one scan of the table).

A dose import's file was kept for good after its import finished; it is now dropped when the import finishes
(its counts and errors stay), and this drops the files of the imports already finished.

Revision ID: 20261128_01
Revises: 20261127_01
Create Date: 2026-11-28 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.migrations import create_index_by_age

revision: str = "20261128_01"
down_revision: str | None = "20261127_01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sa.text("UPDATE dose_imports SET content = :empty WHERE finished_at IS NOT NULL").bindparams(empty=b""))
    create_index_by_age(op, "ix_idempotency_claims_created", "idempotency_claims", "created_at")


def downgrade() -> None:
    op.drop_index("ix_idempotency_claims_created", table_name="idempotency_claims")
