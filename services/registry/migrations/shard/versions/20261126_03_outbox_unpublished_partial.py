"""outbox: the unpublished rows in a partial index of their own, and the table vacuumed after 2 % of it changed

The relay's claim read every version of every row the day's retention keeps through the (published_at, id)
index (see ``shared/outbox.py``, UNPUBLISHED).

Revision ID: 20261126_03
Revises: 20261126_02
Create Date: 2026-11-26 11:00:00
"""

from collections.abc import Sequence

from alembic import op

from shared.outbox import migrate_unpublished_index

revision: str = "20261126_03"
down_revision: str | None = "20261126_02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    migrate_unpublished_index(op, partial=True)


def downgrade() -> None:
    migrate_unpublished_index(op, partial=False)
