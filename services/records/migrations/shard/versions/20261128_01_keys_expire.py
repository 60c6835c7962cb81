"""idempotency keys expire

A shard's answered keys older than ``VRS_RECORDS_IDEMPOTENCY_KEEP_DAYS`` are deleted
(services/records/housekeeping.py), found by age through a BRIN index, built ``CONCURRENTLY`` on PostgreSQL (see
the main tree's 20261128_01).

Revision ID: 20261128_01
Revises: 20261127_06
Create Date: 2026-11-28 02:00:00
"""

from collections.abc import Sequence

from alembic import op

from shared.migrations import create_index_by_age

revision: str = "20261128_01"
down_revision: str | None = "20261127_06"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_index_by_age(op, "ix_idempotency_keys_created", "idempotency_keys", "created_at")


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_created", table_name="idempotency_keys")
