"""outbox payloads compressed with lz4 rather than pglz (PostgreSQL built with lz4)

A bulk import writes its coupon events 1,000 to an outbox row (~330 kB of JSON); pglz compressing them was
~2 µs of PostgreSQL's CPU per imported resident, lz4 a third of it. A server built without lz4 keeps pglz.

Revision ID: 20261125_12
Revises: 20261125_11
Create Date: 2026-11-25 22:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261125_12"
down_revision: str | None = "20261125_11"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _set(method: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        DO $$ BEGIN
            ALTER TABLE outbox ALTER COLUMN payload SET COMPRESSION {method};
        EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
            RAISE NOTICE 'outbox payload compression stays as it is: %', SQLERRM;
        END $$
        """
    )


def upgrade() -> None:
    _set("lz4")


def downgrade() -> None:
    _set("pglz")
