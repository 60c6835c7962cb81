"""issued certificates (接種証明書 / SMART Health Cards) and their revocation

Revision ID: 20261125_02
Revises: 20261125_01
Create Date: 2026-11-25 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '20261125_02'
down_revision: str | None = '20261125_01'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('issued_certificates',
    sa.Column('certificate_id', sa.String(length=36), nullable=False),
    sa.Column('municipality_code', sa.String(length=6), nullable=False),
    sa.Column('resident_id', sa.String(length=64), nullable=False),
    sa.Column('kid', sa.String(length=64), nullable=False),
    sa.Column('rid', sa.String(length=24), nullable=False),
    sa.Column('doses', sa.JSON(), nullable=False),
    sa.Column('subject_digest', sa.String(length=64), nullable=False),
    sa.Column('issued_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_reason', sa.String(length=200), nullable=True),
    sa.PrimaryKeyConstraint('certificate_id'),
    sa.UniqueConstraint('rid')
    )
    with op.batch_alter_table('issued_certificates', schema=None) as batch_op:
        batch_op.create_index('ix_issued_certificates_resident', ['municipality_code', 'resident_id'], unique=False)
        batch_op.create_index('ix_issued_certificates_revoked', ['kid', 'revoked_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('issued_certificates', schema=None) as batch_op:
        batch_op.drop_index('ix_issued_certificates_revoked')
        batch_op.drop_index('ix_issued_certificates_resident')
    op.drop_table('issued_certificates')
