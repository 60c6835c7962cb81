"""records_writes_current(): the write's check also compares each coupon's holder with the one read

The dose path reads a coupon's holder (the coupon projection) and its doses on file without a lock, decides, and
writes in one statement that takes the coupons' advisory locks and checks, under them, that the doses on file
and the keys answered are still what it read (``records_writes_unchanged``, 20261126_04). It did not check the
holder. A coupon event applied between the read and the write (its holder issued, or their sex or birth date
corrected) left the new dose in the cell of the holder before: ``unmatched`` for good when the coupon was new,
since the consumer had read the coupon's doses before the dose was committed, and no later event would move it.

Now the check also compares each coupon's projection version with the one read (0: none), and records' coupon
consumer takes the same advisory locks of the coupons it changes before it reads their doses. Either the
consumer locks first, and the write, waiting for it, finds the version changed and is decided again on the new
holder; or the write locks first, and the consumer, waiting for it, reads the new dose and moves it.

``records_writes_unchanged`` stays for the processes of the release before, which call it until they are
replaced; a later migration drops it with ``records_doses_unchanged``.

Revision ID: 20261127_02
Revises: 20261127_01
Create Date: 2026-11-27 10:00:00
"""

import runpy
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "20261127_02"
down_revision: str | None = "20261127_01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = runpy.run_path(str(Path(__file__).with_name("20261126_04_writes_compare_sets.py")))

# As before: each member's coupons' doses on file now, and the members with a key answered since they read.
ON_FILE = _BEFORE["ON_FILE"]
KEYS_ANSWERED = _BEFORE["KEYS_ANSWERED"]
# Members whose coupon's holder is not the one read: one index probe per coupon, 0 standing for no holder.
HOLDERS_CHANGED = """
SELECT w.g FROM unnest(coupon_members, municipalities, coupon_numbers, holder_versions) AS w(g, m, n, v)
LEFT JOIN LATERAL (
    SELECT c.version FROM coupons c WHERE c.municipality_code = w.m AND c.coupon_number = w.n OFFSET 0
) AS c ON true
WHERE coalesce(c.version, 0) <> w.v
"""

PASSED = f"""
WITH on_file AS MATERIALIZED ({ON_FILE}),
was_read AS MATERIALIZED (SELECT * FROM unnest(seen_members, seen) AS s(g, dose_id))
SELECT g FROM generate_series(0, members - 1) AS g
EXCEPT (
    SELECT g FROM (TABLE on_file EXCEPT TABLE was_read) AS recorded_since
    UNION SELECT g FROM (TABLE was_read EXCEPT TABLE on_file) AS gone_since
    UNION {HOLDERS_CHANGED}
    UNION {KEYS_ANSWERED}
)
ORDER BY 1
"""

# records_writes_unchanged of 20261126_04 under its new name, with the holders' versions read as one more
# argument and the check above.
CREATE = (
    _BEFORE["CREATE"]
    .replace(_BEFORE["PASSED"], PASSED)
    .replace("FUNCTION records_writes_unchanged(", "FUNCTION records_writes_current(")
    .replace("coupon_numbers varchar[],", "coupon_numbers varchar[], holder_versions integer[],")
)
assert PASSED in CREATE and "records_writes_current(" in CREATE and "holder_versions integer[]" in CREATE

DROP = """
DROP FUNCTION IF EXISTS records_writes_current(
    integer, bigint[], integer[], varchar[], varchar[], integer[], integer[], varchar[], integer[], varchar[], varchar[]
)
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(DROP)
