"""transfer disclosures (情報提供等記録): whose records each transfer lookup read, for whom

One row per (lookup item, other municipality) of a lookup that read something, written in the lookup's
transaction. The person is named by each municipality's own resident id, never by a My Number or its hash.

Revision ID: 20261127_02
Revises: 20261127_01
Create Date: 2026-11-27 20:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261127_02"
down_revision: str | None = "20261127_01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "transfer_disclosures",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("disclosed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("caller_municipality", sa.String(length=6), nullable=False),
        sa.Column("caller_resident_id", sa.String(length=64), nullable=False),
        sa.Column("source_municipality", sa.String(length=6), nullable=False),
        sa.Column("source_resident_id", sa.String(length=64), nullable=False),
        sa.Column("legal_basis", sa.String(length=32), nullable=False),
        sa.Column("doses", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("transfer_disclosures") as batch:
        batch.create_index(
            "ix_transfer_disclosures_caller", ["caller_municipality", "caller_resident_id", "disclosed_at"]
        )
        batch.create_index(
            "ix_transfer_disclosures_source", ["source_municipality", "source_resident_id", "disclosed_at"]
        )


def downgrade() -> None:
    with op.batch_alter_table("transfer_disclosures") as batch:
        batch.drop_index("ix_transfer_disclosures_source")
        batch.drop_index("ix_transfer_disclosures_caller")
    op.drop_table("transfer_disclosures")
