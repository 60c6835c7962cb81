"""doses: the 10-year age band of the statistics cell

Revision ID: 20261125_13
Revises: 20261125_12
Create Date: 2026-11-25 18:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261125_13"
down_revision: str | None = "20261125_12"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing doses stay UNK, not their real band: their events carried no 10-year band, so stats counted
    # them as UNK, and the next event of such a dose must take back exactly what was added.
    with op.batch_alter_table("doses") as batch:
        batch.add_column(sa.Column("age_band_10", sa.String(length=5), nullable=False, server_default="UNK"))


def downgrade() -> None:
    with op.batch_alter_table("doses") as batch:
        batch.drop_column("age_band_10")
