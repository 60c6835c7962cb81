"""transfer disclosures past their retention are deleted: found by age

情報提供等記録 are kept ``VRS_REGISTRY_DISCLOSURE_KEEP_YEARS`` (seven years at least) and then deleted
(services/registry/housekeeping.py), found by age through a BRIN index: a few pages for the whole log, rarely
touched by an insert at its end. Built ``CONCURRENTLY`` on PostgreSQL, so lookups keep being logged while it is.

Revision ID: 20261128_02
Revises: 20261128_01
Create Date: 2026-11-28 03:00:00
"""

from collections.abc import Sequence

from alembic import op

from shared.migrations import create_index_by_age

revision: str = "20261128_02"
down_revision: str | None = "20261128_01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_index_by_age(op, "ix_transfer_disclosures_age", "transfer_disclosures", "disclosed_at")


def downgrade() -> None:
    op.drop_index("ix_transfer_disclosures_age", table_name="transfer_disclosures")
