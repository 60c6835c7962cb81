"""rollups of dose_counts kept with it (dose_totals_by_*), and the aggregates' version for cached answers

Revision ID: 20261125_03
Revises: 20261125_02
Create Date: 2026-11-25 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261125_03"
down_revision: str | None = "20261125_02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TYPES = {
    "date": sa.Date(),
    "prefecture": sa.String(length=2),
    "sex": sa.String(length=1),
    "age_band": sa.String(length=3),
    "age_band_10": sa.String(length=5),
    "medical_worker": sa.Boolean(),
    "dose_number": sa.SmallInteger(),
}
# As services.stats.models.ROLLUPS had them when this was written (a migration never follows later edits).
ROLLUPS = {
    "dose_totals_by_date": ("date", "dose_number"),
    "dose_totals_by_prefecture": ("prefecture", "dose_number", "sex", "age_band", "age_band_10", "medical_worker"),
    "dose_totals_by_prefecture_date": ("prefecture", "date", "dose_number"),
    "dose_totals_by_cell": ("date", "prefecture", "sex", "age_band", "age_band_10", "medical_worker", "dose_number"),
}


def upgrade() -> None:
    for name, dims in ROLLUPS.items():
        columns = [
            sa.Column(d, TYPES[d], nullable=False, server_default="UNK" if d == "age_band_10" else None) for d in dims
        ]
        op.create_table(name, *columns, sa.Column("count", sa.BigInteger(), nullable=False), sa.PrimaryKeyConstraint(*dims))
        keys = ", ".join(dims)
        # Filled from the cells already counted, in this transaction: from here on the consumer keeps them.
        op.execute(f"INSERT INTO {name} ({keys}, count) SELECT {keys}, SUM(count) FROM dose_counts GROUP BY {keys}")
    version = op.create_table(
        "aggregates_version",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(version, [{"id": 1, "version": 0}])


def downgrade() -> None:
    op.drop_table("aggregates_version")
    for name in reversed(ROLLUPS):
        op.drop_table(name)
