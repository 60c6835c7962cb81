"""keyed audit trail: one HMAC chain per gateway instance; the unkeyed log is kept, renamed, unverified

Revision ID: 20261125_01
Revises: 20261124_01
Create Date: 2026-11-25 15:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '20261125_01'
down_revision: str | None = '20261124_01'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Its entries were hashed without a key, so nothing proves them: kept for reading, never verified.
    op.rename_table('audit_log', 'audit_log_unkeyed')
    op.create_table('audit_trail',
    sa.Column('instance', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('request_id', sa.Text(), nullable=False),
    sa.Column('principal', sa.Text(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('caller_municipality', sa.String(length=6), nullable=True),
    sa.Column('institution', sa.String(length=10), nullable=True),
    sa.Column('municipality', sa.String(length=6), nullable=True),
    sa.Column('action', sa.Text(), nullable=False),
    sa.Column('resource', sa.Text(), nullable=False),
    sa.Column('legal_basis', sa.String(length=32), nullable=False),
    sa.Column('outcome', sa.Integer(), nullable=False),
    sa.Column('prev_mac', sa.String(length=64), nullable=False),
    sa.Column('mac', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('instance', 'seq')
    )
    op.create_index('ix_audit_trail_municipality_time', 'audit_trail', ['municipality', 'recorded_at'], unique=False)
    op.create_index('ix_audit_trail_caller_municipality_time', 'audit_trail', ['caller_municipality', 'recorded_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_audit_trail_caller_municipality_time', table_name='audit_trail')
    op.drop_index('ix_audit_trail_municipality_time', table_name='audit_trail')
    op.drop_table('audit_trail')
    op.rename_table('audit_log_unkeyed', 'audit_log')
