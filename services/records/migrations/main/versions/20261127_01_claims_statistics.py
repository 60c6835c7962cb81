"""Column statistics only where a query looks: idempotency_claims by (scope, key)

As in the shards' 20261127_05: a claim is found by its key, so the request hash and shard columns keep no
statistics, and ``ANALYZE`` of the table (every 10 % of growth while it is young) builds only what the planner uses.

Revision ID: 20261127_01
Revises: 20261125_11
Create Date: 2026-11-27 16:10:00
"""

from collections.abc import Sequence

from alembic import op

from shared.migrations import set_statistics

revision: str = "20261127_01"
down_revision: str | None = "20261125_11"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNQUERIED = {"idempotency_claims": ("request_hash", "shard")}


def upgrade() -> None:
    set_statistics(op, UNQUERIED, 0)


def downgrade() -> None:
    set_statistics(op, UNQUERIED, -1)
