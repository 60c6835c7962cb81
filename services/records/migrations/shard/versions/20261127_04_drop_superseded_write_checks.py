"""Drop the dose write's checks that no running release calls: records_doses_unchanged, records_writes_unchanged

Each change of the write's check came as a function of a new name, the one before kept for the processes of the
release before, which call it until they are replaced. The release before this one calls
``records_writes_current`` (20261127_02); nothing calls ``records_doses_unchanged`` (20261125_12, 20261126_01: a
single request's check, before writes were grouped) or ``records_writes_unchanged`` (20261126_02, 20261126_04: the
grouped check before it compared holders) any more. ``records_writes_current`` stays until the release after.

Revision ID: 20261127_04
Revises: 20261127_03
Create Date: 2026-11-27 14:00:00
"""

import runpy
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "20261127_04"
down_revision: str | None = "20261127_03"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HERE = Path(__file__).parent

DROP = (
    "DROP FUNCTION IF EXISTS records_doses_unchanged(bigint[], varchar[], varchar[], varchar[], varchar, varchar[])",
    "DROP FUNCTION IF EXISTS records_writes_unchanged("
    "integer, bigint[], integer[], varchar[], varchar[], integer[], varchar[], integer[], varchar[], varchar[])",
)


def _as_they_were() -> tuple[str, str]:
    """The two functions as their last migrations left them."""
    single = runpy.run_path(str(_HERE / "20261126_01_seen_probes.py"))
    grouped = runpy.run_path(str(_HERE / "20261126_04_writes_compare_sets.py"))
    return single["FUNCTION"].replace("COUNT_SEEN", single["PROBE_COUNT"]), grouped["CREATE"]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in DROP:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in _as_they_were():
            op.execute(statement)
