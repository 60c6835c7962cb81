"""dose_counts: the 10-year age band as one more dimension of the cell (in the primary key)

Revision ID: 20261125_02
Revises: 20261125_01
Create Date: 2026-11-25 18:45:00
"""

import warnings
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261125_02"
down_revision: str | None = "20261125_01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KEY = ["date", "prefecture", "municipality", "sex", "age_band", "medical_worker", "dose_number", "vaccine"]
NEW_KEY = [*OLD_KEY[:5], "age_band_10", *OLD_KEY[5:]]


def upgrade() -> None:
    # Every existing cell was counted from events without a 10-year band: UNK, as a replay would count them.
    column = sa.Column("age_band_10", sa.String(length=5), nullable=False, server_default="UNK")
    if op.get_bind().dialect.name == "postgresql":
        op.add_column("dose_counts", column)
        op.drop_constraint("dose_counts_pkey", "dose_counts", type_="primary")
        op.create_primary_key("dose_counts_pkey", "dose_counts", NEW_KEY)
    else:  # SQLite cannot change a primary key in place: batch mode copies the table
        with warnings.catch_warnings():
            # SQLAlchemy notes that the copy's primary key differs from the reflected one: that is the point.
            warnings.filterwarnings("ignore", message=".*primary_key=True, not matching", category=sa.exc.SAWarning)
            with op.batch_alter_table("dose_counts", recreate="always") as batch:
                batch.add_column(column)
                batch.create_primary_key("dose_counts_pkey", NEW_KEY)


def downgrade() -> None:
    # Folding the 10-year bands back together keeps every count; the database does it, in one statement.
    op.create_table(
        "dose_counts_down",
        sa.Column("date", sa.Date(), nullable=False),
        sa.Column("prefecture", sa.String(length=2), nullable=False),
        sa.Column("municipality", sa.String(length=6), nullable=False),
        sa.Column("sex", sa.String(length=1), nullable=False),
        sa.Column("age_band", sa.String(length=3), nullable=False),
        sa.Column("medical_worker", sa.Boolean(), nullable=False),
        sa.Column("dose_number", sa.SmallInteger(), nullable=False),
        sa.Column("vaccine", sa.String(length=32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(*OLD_KEY, name="dose_counts_down_pkey"),
    )
    keys = ", ".join(OLD_KEY)
    op.execute(f"INSERT INTO dose_counts_down ({keys}, count) SELECT {keys}, SUM(count) FROM dose_counts GROUP BY {keys}")
    op.drop_index("ix_dose_counts_municipality_date", table_name="dose_counts")
    op.drop_table("dose_counts")
    op.rename_table("dose_counts_down", "dose_counts")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER INDEX dose_counts_down_pkey RENAME TO dose_counts_pkey")
    op.create_index("ix_dose_counts_municipality_date", "dose_counts", ["municipality", "date"], unique=False)
