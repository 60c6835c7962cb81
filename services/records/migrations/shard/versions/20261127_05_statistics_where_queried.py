"""Column statistics only where a query filters, joins or orders: doses and idempotency_keys

``ANALYZE`` reads a sample of 30,000 rows and builds statistics for every column of it. Records' statements find
doses by id, by coupon (municipality, number), by review status and voided, and order them by dose number,
vaccination date and recording time; keys by (scope, key). The planner never uses the other columns' statistics,
yet building them was about 30 % of each table's ``ANALYZE`` (median of five at 180,000 rows: ``doses`` 115 → 83 ms
of a core, ``idempotency_keys`` 80 → 56 ms). While a table is young autovacuum analyzes it at every 10 % of growth,
so at 1,000 doses a second that was once every 10-20 s, each time taking a core from the dose requests for a
moment. Those columns now keep no statistics (``SET STATISTICS 0``); a column added later gets the default.

Revision ID: 20261127_05
Revises: 20261127_04
Create Date: 2026-11-27 16:10:00
"""

from collections.abc import Sequence

from alembic import op

from shared.migrations import set_statistics

revision: str = "20261127_05"
down_revision: str | None = "20261127_04"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNQUERIED = {
    "doses": (
        "coupon_line", "vaccine", "lot_number", "venue", "doctor", "medical_worker", "findings", "rules_version",
        "resident_id", "sex", "age_band", "age_band_10", "recorded_by", "updated_at", "version",
    ),
    "idempotency_keys": ("request_hash", "dose_id", "response"),
}  # fmt: skip


def upgrade() -> None:
    set_statistics(op, UNQUERIED, 0)


def downgrade() -> None:
    set_statistics(op, UNQUERIED, -1)
