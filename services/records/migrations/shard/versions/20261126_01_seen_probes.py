"""records_doses_unchanged(): the doses read are counted by a key probe each, not by ``dose_id = ANY(seen)``

The function's statements are cached once per connection with a generic plan (records' connections force them,
see ``services/records/repository.py``). ``count(*) … WHERE dose_id = ANY(seen)`` planned while the shard was
small kept scanning ``doses`` whole: 0.3-0.4 ms of every single dose's write in the bench, growing with the
table. A lateral probe with ``LIMIT 1`` is an index lookup per id whatever the plan, and nothing for a new
coupon (no doses seen).

Revision ID: 20261126_01
Revises: 20261125_15
Create Date: 2026-11-26 01:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261126_01"
down_revision: str | None = "20261125_15"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ANY_COUNT = "(SELECT count(*) FROM doses WHERE dose_id = ANY(seen) AND NOT voided)"
PROBE_COUNT = (
    "(SELECT count(*) FROM unnest(seen) AS s(id) CROSS JOIN LATERAL ("
    "SELECT 1 FROM doses d WHERE d.dose_id = s.id AND NOT d.voided LIMIT 1) AS found)"
)
FUNCTION = """
CREATE OR REPLACE FUNCTION records_doses_unchanged(
    lock_keys bigint[], municipalities varchar[], coupon_numbers varchar[], seen varchar[],
    key_scope varchar, answered varchar[]
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(k) FROM unnest(lock_keys) AS k;
    IF EXISTS (
        SELECT 1 FROM unnest(municipalities, coupon_numbers) AS w(m, n)
        CROSS JOIN LATERAL (
            SELECT 1 FROM doses d
             WHERE d.municipality_code = w.m AND d.coupon_number = w.n AND NOT d.voided
               AND NOT (d.dose_id = ANY(seen))
             LIMIT 1
        ) AS other
    ) THEN
        RETURN false;
    END IF;
    IF COUNT_SEEN <> cardinality(seen) THEN
        RETURN false;
    END IF;
    RETURN NOT EXISTS (
        SELECT 1 FROM unnest(answered) AS a(k) CROSS JOIN LATERAL (
            SELECT 1 FROM idempotency_keys i WHERE i.scope = key_scope AND i.key = a.k LIMIT 1
        ) AS found
    );
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION.replace("COUNT_SEEN", PROBE_COUNT))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION.replace("COUNT_SEEN", ANY_COUNT))
