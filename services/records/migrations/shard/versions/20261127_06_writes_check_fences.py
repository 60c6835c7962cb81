"""The dose write's check refuses a fenced municipality: records_writes_as_read and records_writes_current

A shard move fences the municipality on its source (``shared/shardmove.py``): the fence triggers on ``doses``,
``coupons`` and ``outbox`` (20261125_11) refuse its writes there. ``idempotency_keys`` has no municipality column
and no trigger. A request whose every item is an exact duplicate of a dose on file (a double scan) stores key
rows only, so it passed the fence: written after the move's catch-up had read the keys, or by a process whose
cached shard map still named the old shard in the seconds after the flip, the keys stayed on the source and were
deleted with it. The client had been answered ``duplicate``; its retry was decided again.

Now the write's check, which every dose write calls once per statement with the municipalities of its coupons,
first looks them up in ``shard_fences`` and raises the fence's own error (SQLSTATE ``VR503``, the municipality as
its detail) when one is fenced: the statement stores nothing, and the request is answered as any fenced write
(503 with ``Retry-After``; the cached shard forgotten, so the retry finds the new one). One look at a table of a
few rows per statement, none per key or dose.

Both functions are replaced in place (same arguments, same result): the processes of this release (which call
``records_writes_as_read``) and of the release before (``records_writes_current``) are covered from this
migration on, with no new function to call. The downgrade puts back the bodies of 20261127_03 and 20261127_02.

Revision ID: 20261127_06
Revises: 20261127_05
Create Date: 2026-11-27 18:00:00
"""

import runpy
from collections.abc import Sequence
from pathlib import Path

from alembic import op

from shared.shardmove import FENCE_SQLSTATE

revision: str = "20261127_06"
down_revision: str | None = "20261127_05"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HERE = Path(__file__).parent
# The checks as their last migrations left them (what a downgrade puts back).
BEFORE = (
    runpy.run_path(str(_HERE / "20261127_03_writes_check_dose_versions.py"))["CREATE"],
    runpy.run_path(str(_HERE / "20261127_02_writes_check_holders.py"))["CREATE"],
)

_START = "RETURNS integer[] LANGUAGE plpgsql VOLATILE AS $$\nBEGIN\n"
FENCE_CHECK = f"""RETURNS integer[] LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    fenced varchar;
BEGIN
    -- Before the coupons' locks: a municipality fenced on this shard (moving away, or moved) is refused for the
    -- whole statement, as its rows are by the fence triggers. Key rows have no municipality for a trigger to see.
    SELECT f.municipality_code INTO fenced FROM shard_fences f WHERE f.municipality_code = ANY(municipalities) LIMIT 1;
    IF fenced IS NOT NULL THEN
        RAISE EXCEPTION 'municipality % is moving to another shard; retry shortly', fenced
            USING ERRCODE = '{FENCE_SQLSTATE}', DETAIL = fenced;
    END IF;
"""

AFTER = tuple(create.replace(_START, FENCE_CHECK) for create in BEFORE)
assert all(create.count(_START) == 1 for create in BEFORE) and all(FENCE_CHECK in create for create in AFTER)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in AFTER:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in BEFORE:
            op.execute(statement)
