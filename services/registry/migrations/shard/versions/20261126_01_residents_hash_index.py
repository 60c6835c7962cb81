"""residents: drop the index on ``my_number_hash``

No query looks residents up by the keyed hash: a My Number is found through ``my_number_directory`` in the
main database. The index only cost every write: a random 32-byte key per resident, 79 bytes and ~4 µs of
PostgreSQL's CPU per resident in a bulk import (its ``residents`` COPY 8.9 µs a row with it, 4.9 without).

Revision ID: 20261126_01
Revises: 20261125_12
Create Date: 2026-11-26 00:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261126_01"
down_revision: str | None = "20261125_12"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("residents", schema=None) as batch_op:
        batch_op.drop_index("ix_residents_my_number_hash")


def downgrade() -> None:
    with op.batch_alter_table("residents", schema=None) as batch_op:
        batch_op.create_index("ix_residents_my_number_hash", ["my_number_hash"], unique=False)
