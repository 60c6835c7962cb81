"""shard moves: each move's progress, write pause and rows

Revision ID: 20261125_11
Revises: 20261125_02
Create Date: 2026-11-25 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261125_11"
down_revision: str | None = "20261125_02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shard_moves",
        sa.Column("municipality_code", sa.String(length=6), nullable=False),
        sa.Column("from_shard", sa.String(length=64), nullable=False),
        sa.Column("to_shard", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fenced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("flipped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pause_seconds", sa.Float(), nullable=True),
        sa.Column("rows", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("municipality_code"),
    )


def downgrade() -> None:
    op.drop_table("shard_moves")
