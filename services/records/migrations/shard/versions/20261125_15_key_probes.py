"""records_doses_unchanged(): the answered-keys check probes the key index once per key

Revision ID: 20261125_15
Revises: 20261125_14
Create Date: 2026-11-25 22:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261125_15"
down_revision: str | None = "20261125_14"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# All of a caller's keys share its scope, so ``scope = key_scope AND key = ANY(answered)`` was planned as a scan
# of every key the caller ever sent (90-175 ms per 500-dose batch at 25,000 keys, and growing): one probe of
# the primary key per answered key instead. The rest of the function is as migration 20261125_12 wrote it.
ANY_CHECK = "SELECT 1 FROM idempotency_keys WHERE scope = key_scope AND key = ANY(answered)"
PROBE_CHECK = (
    "SELECT 1 FROM unnest(answered) AS a(k) CROSS JOIN LATERAL ("
    "SELECT 1 FROM idempotency_keys i WHERE i.scope = key_scope AND i.key = a.k LIMIT 1) AS found"
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
    IF (SELECT count(*) FROM doses WHERE dose_id = ANY(seen) AND NOT voided) <> cardinality(seen) THEN
        RETURN false;
    END IF;
    RETURN NOT EXISTS (CHECK);
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION.replace("CHECK", PROBE_CHECK))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION.replace("CHECK", ANY_CHECK))
