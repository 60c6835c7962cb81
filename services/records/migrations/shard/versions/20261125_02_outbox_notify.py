"""outbox: NOTIFY the relay on commit (PostgreSQL)

Revision ID: 20261125_02
Revises: 20261125_01
Create Date: 2026-11-25 16:30:00
"""

from collections.abc import Sequence

from alembic import op

from shared.outbox import DROP_NOTIFY_TRIGGER_SQL, NOTIFY_TRIGGER_SQL

revision: str = "20261125_02"
down_revision: str | None = "20261125_01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A relay in any process LISTENs and wakes at once; SQLite (embedded, one process) is woken in-process.
    if op.get_bind().dialect.name == "postgresql":
        for statement in NOTIFY_TRIGGER_SQL:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in DROP_NOTIFY_TRIGGER_SQL:
            op.execute(statement)
