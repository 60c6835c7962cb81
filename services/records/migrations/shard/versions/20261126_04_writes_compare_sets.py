"""records_writes_unchanged(): the doses on file are compared with those read as two sets, one hash each

The check looked for another dose on a member's coupons with ``NOT (d.dose_id = ANY(seen))``: each dose on file
compared with every id read, a linear search of an array per dose. A batch of a thousand third doses (two doses on
file per coupon) made that four million comparisons: its write took 75-131 ms against 33-60 ms for first doses
(measured on the test harness's PostgreSQL). Now the doses on file of each member's coupons (an index probe per
coupon) and the doses it read are two sets of (member, dose id), and a member whose two sets differ either way
(a dose recorded since, or one read that is voided or gone since) did not pass: ``EXCEPT``, a hash of each, in
time linear in the doses.

This one function now serves every write, a batch's as a single dose's: the batch is a statement of one member
(``DoseRepository.record``). ``records_doses_unchanged`` stays for the processes of the release before, which call
it until they are replaced; a later migration drops it.

Revision ID: 20261126_04
Revises: 20261126_03
Create Date: 2026-11-26 13:10:00
"""

import runpy
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "20261126_04"
down_revision: str | None = "20261126_03"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = runpy.run_path(str(Path(__file__).with_name("20261126_02_group_writes.py")))

# Each member's coupons' doses on file now: one index probe per coupon, whatever the generic plan guesses.
ON_FILE = """
SELECT w.g, d.dose_id FROM unnest(coupon_members, municipalities, coupon_numbers) AS w(g, m, n)
CROSS JOIN LATERAL (
    SELECT d.dose_id FROM doses d WHERE d.municipality_code = w.m AND d.coupon_number = w.n AND NOT d.voided
    OFFSET 0
) AS d
"""
# Members with a key answered since they read: as before.
KEYS_ANSWERED = _BEFORE["KEYS_ANSWERED"]

# The members that passed: neither set of doses changed, and no key was answered since.
PASSED = f"""
WITH on_file AS MATERIALIZED ({ON_FILE}),
was_read AS MATERIALIZED (SELECT * FROM unnest(seen_members, seen) AS s(g, dose_id))
SELECT g FROM generate_series(0, members - 1) AS g
EXCEPT (
    SELECT g FROM (TABLE on_file EXCEPT TABLE was_read) AS recorded_since
    UNION SELECT g FROM (TABLE was_read EXCEPT TABLE on_file) AS gone_since
    UNION {KEYS_ANSWERED}
)
ORDER BY 1
"""

CREATE = f"""
CREATE OR REPLACE FUNCTION records_writes_unchanged(
    members integer, lock_keys bigint[],
    coupon_members integer[], municipalities varchar[], coupon_numbers varchar[],
    seen_members integer[], seen varchar[],
    key_members integer[], key_scopes varchar[], answered varchar[]
) RETURNS integer[] LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Every member's locks, in the one sorted order given; held to the end of the calling statement.
    PERFORM pg_advisory_xact_lock(k) FROM unnest(lock_keys) AS k;
    -- PL/pgSQL on purpose (see records_doses_unchanged): this query sees what was committed while it waited.
    RETURN ARRAY({PASSED});
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_BEFORE["CREATE"])
