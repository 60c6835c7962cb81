"""shard moves: fences (a municipality moving in or out) and the triggers that enforce them (PostgreSQL)

Revision ID: 20261125_11
Revises: 20261125_02
Create Date: 2026-11-25 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.shardmove import drop_fence_trigger_sql, fence_trigger_sql

revision: str = "20261125_11"
down_revision: str | None = "20261125_02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ALL = ("INSERT", "UPDATE", "DELETE")
# The tables with a municipality column; the outbox only on INSERT (the relay marks rows published).
FENCED = [("doses", "municipality_code", ALL), ("coupons", "municipality_code", ALL), ("outbox", "key", ("INSERT",))]


def upgrade() -> None:
    op.create_table(
        "shard_fences",
        sa.Column("municipality_code", sa.String(length=6), nullable=False),
        sa.Column("moving_to", sa.String(length=64), nullable=False),
        sa.Column("fenced_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("municipality_code"),
    )
    if op.get_bind().dialect.name == "postgresql":
        for statement in fence_trigger_sql(FENCED):
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in drop_fence_trigger_sql(FENCED):
            op.execute(statement)
    op.drop_table("shard_fences")
