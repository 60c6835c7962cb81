"""Column statistics only where a query looks: audit_trail

As records' 20261127_05: the audit trail is read by chain (instance, seq) and by municipality and time (a
municipality's own entries), so the other eleven columns keep no statistics and ``ANALYZE`` of the table (every
10 % of growth while it is young: every dose request writes to it) builds only what the planner uses. At 47,000
entries it took 116 ms of a core.

Revision ID: 20261127_01
Revises: 20261125_02
Create Date: 2026-11-27 16:00:00
"""

from collections.abc import Sequence

from alembic import op

from shared.migrations import set_statistics

revision: str = "20261127_01"
down_revision: str | None = "20261125_02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNQUERIED = {
    "audit_trail": (
        "request_id", "principal", "role", "institution", "action", "resource", "legal_basis", "outcome",
        "intent_seq", "prev_mac", "mac",
    ),
}  # fmt: skip


def upgrade() -> None:
    set_statistics(op, UNQUERIED, 0)


def downgrade() -> None:
    set_statistics(op, UNQUERIED, -1)
