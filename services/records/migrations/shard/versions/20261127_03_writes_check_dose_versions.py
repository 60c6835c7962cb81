"""records_writes_as_read(): the write's check also compares each dose on file with the version read

The dose path decides a dose on the coupon's doses on file (the intervals, the dose numbers, an exact duplicate)
and writes only if, under the coupon's lock, those doses are still the ones it read (``records_writes_current``,
20261127_02). It compared their ids only. A municipality correcting one of them (its date, dose number or
vaccine) between the read and the write keeps the id: the new dose was stored with findings decided on the dose as
it was — a second dose judged against a first dose's old date, or recorded beside a first dose just corrected into
its exact duplicate.

Now the doses read and the doses on file are compared as (id, version) pairs: a correction raises the version, so
the write is refused and the dose is read and decided again. A correction takes the coupon's lock before the
dose's row (``correct_dose``), so it cannot commit between a locked read and its write either.

``records_writes_current`` stays for the processes of the release before, which call it until they are replaced;
a later migration drops it with ``records_writes_unchanged`` and ``records_doses_unchanged``.

Revision ID: 20261127_03
Revises: 20261127_02
Create Date: 2026-11-27 13:30:00
"""

import runpy
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "20261127_03"
down_revision: str | None = "20261127_02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = runpy.run_path(str(Path(__file__).with_name("20261127_02_writes_check_holders.py")))

# Each member's coupons' doses on file now, with their versions: one index probe per coupon, as before.
ON_FILE = _BEFORE["ON_FILE"].replace("w.g, d.dose_id FROM", "w.g, d.dose_id, d.version FROM").replace(
    "SELECT d.dose_id FROM doses d", "SELECT d.dose_id, d.version FROM doses d"
)
assert ON_FILE.count("d.version") == 2
HOLDERS_CHANGED = _BEFORE["HOLDERS_CHANGED"]
KEYS_ANSWERED = _BEFORE["KEYS_ANSWERED"]

PASSED = (
    _BEFORE["PASSED"]
    .replace(_BEFORE["ON_FILE"], ON_FILE)
    .replace(
        "unnest(seen_members, seen) AS s(g, dose_id)", "unnest(seen_members, seen, seen_versions) AS s(g, dose_id, version)"
    )
)
assert ON_FILE in PASSED and "seen_versions" in PASSED

# records_writes_current of 20261127_02 under its new name, with the versions of the doses read as one more
# argument (beside their ids) and the check above.
CREATE = (
    _BEFORE["CREATE"]
    .replace(_BEFORE["PASSED"], PASSED)
    .replace("FUNCTION records_writes_current(", "FUNCTION records_writes_as_read(")
    .replace("seen varchar[],", "seen varchar[], seen_versions integer[],")
)
assert PASSED in CREATE and "records_writes_as_read(" in CREATE and "seen_versions integer[]" in CREATE

DROP = """
DROP FUNCTION IF EXISTS records_writes_as_read(
    integer, bigint[], integer[], varchar[], varchar[], integer[], integer[], varchar[], integer[], integer[],
    varchar[], varchar[]
)
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(DROP)
