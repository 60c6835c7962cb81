"""outbox: room on each page for the rows' publish marks (``shared.outbox.OUTBOX_FILLFACTOR``)

A mark is never a HOT update (``published_at`` is in the partial index's predicate); with room on the page its
new version stays there, and PostgreSQL writes only the changed part of the row to the WAL.

Revision ID: 20261127_01
Revises: 20261126_03
Create Date: 2026-11-27 01:00:00
"""

from collections.abc import Sequence

from alembic import op

from shared.outbox import migrate_outbox_fillfactor

revision: str = "20261127_01"
down_revision: str | None = "20261126_03"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    migrate_outbox_fillfactor(op, room=True)


def downgrade() -> None:
    migrate_outbox_fillfactor(op, room=False)
