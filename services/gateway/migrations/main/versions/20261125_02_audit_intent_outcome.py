"""audit intent and outcome: an entry before a request is forwarded (outcome null), its outcome in a later one

Revision ID: 20261125_02
Revises: 20261125_01
Create Date: 2026-11-25 18:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '20261125_02'
down_revision: str | None = '20261125_01'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch: SQLite cannot drop a NOT NULL in place.
    with op.batch_alter_table('audit_trail') as batch:
        batch.alter_column('outcome', existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column('intent_seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True))


def downgrade() -> None:
    # ``outcome`` stays nullable: intent entries cannot be given an outcome, nor deleted (they are evidence).
    # Outcome entries keyed with their intent_seq no longer verify after this: a downgrade loses that proof.
    with op.batch_alter_table('audit_trail') as batch:
        batch.drop_column('intent_seq')
