"""the audit trail's retention: where each chain was cut

Entries older than ``VRS_GATEWAY_AUDIT_KEEP_YEARS`` are deleted from the front of their chain
(services/gateway/housekeeping.py); ``audit_cuts`` keeps, per chain, the last entry deleted and its MAC, keyed with
the audit key, so that ``vrs audit verify`` checks the chain from there on.

Revision ID: 20261128_01
Revises: 20261127_01
Create Date: 2026-11-28 04:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261128_01"
down_revision: str | None = "20261127_01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_cuts",
        sa.Column("instance", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.Column("kept_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cut_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cut_mac", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    # A chain cut by retention no longer verifies without its cut: a downgrade loses that proof.
    op.drop_table("audit_cuts")
