"""transfer disclosures by municipality and time: a municipality reads all of its log for a period

``GET …/{code}/disclosures`` pages through a municipality's lookups (received) and others' lookups of its
records (provided), newest first, by (time, id): one index per direction, in that order.

Revision ID: 20261128_01
Revises: 20261127_02
Create Date: 2026-11-28 00:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261128_01"
down_revision: str | None = "20261127_02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("transfer_disclosures") as batch:
        batch.create_index("ix_transfer_disclosures_caller_time", ["caller_municipality", "disclosed_at", "id"])
        batch.create_index("ix_transfer_disclosures_source_time", ["source_municipality", "disclosed_at", "id"])


def downgrade() -> None:
    with op.batch_alter_table("transfer_disclosures") as batch:
        batch.drop_index("ix_transfer_disclosures_source_time")
        batch.drop_index("ix_transfer_disclosures_caller_time")
