"""processed_events remember where each event was read, so that old ids can be pruned behind the offsets

Revision ID: 20261125_01
Revises: 20261124_01
Create Date: 2026-11-25 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '20261125_01'
down_revision: str | None = '20261124_01'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('processed_events') as batch:
        batch.add_column(sa.Column('event_partition', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('event_offset', sa.BigInteger(), nullable=True))
    op.create_index(
        'ix_processed_events_position', 'processed_events', ['consumer', 'event_partition', 'event_offset']
    )


def downgrade() -> None:
    op.drop_index('ix_processed_events_position', table_name='processed_events')
    with op.batch_alter_table('processed_events') as batch:
        batch.drop_column('event_offset')
        batch.drop_column('event_partition')
