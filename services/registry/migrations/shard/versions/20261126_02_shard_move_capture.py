"""shard moves: the source records the keys of a moving municipality's rows written during the pre-copy

Under the fence, the catch-up then carries only those rows, instead of scanning every row of the municipality
on both shards to find them (the write pause grew with the municipality's size).

Revision ID: 20261126_02
Revises: 20261126_01
Create Date: 2026-11-26 00:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from shared.shardmove import capture_trigger_sql, drop_capture_trigger_sql

revision: str = "20261126_02"
down_revision: str | None = "20261126_01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, municipality column, key columns)
CAPTURED = [
    ("residents", "municipality_code", ("municipality_code", "resident_id")),
    ("coupons", "municipality_code", ("municipality_code", "coupon_number")),
    ("resident_history", "municipality_code", ("municipality_code", "resident_id", "version")),
    ("outbox", "key", ("event_id",)),
]


def upgrade() -> None:
    op.create_table(
        "shard_captures",
        sa.Column("municipality_code", sa.String(length=6), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("municipality_code"),
    )
    op.create_table(
        "shard_move_changes",
        sa.Column("municipality_code", sa.String(length=6), nullable=False),
        sa.Column("table_name", sa.String(length=63), nullable=False),
        sa.Column("row_key", postgresql.ARRAY(sa.Text()).with_variant(sa.JSON(), "sqlite"), nullable=False),
    )
    op.create_index("ix_shard_move_changes", "shard_move_changes", ["municipality_code", "table_name"])
    if op.get_bind().dialect.name == "postgresql":
        for statement in capture_trigger_sql(CAPTURED):
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in drop_capture_trigger_sql(CAPTURED):
            op.execute(statement)
    op.drop_index("ix_shard_move_changes", table_name="shard_move_changes")
    op.drop_table("shard_move_changes")
    op.drop_table("shard_captures")
