"""records_doses_unchanged(): the dose write's check, under the coupons' locks (PostgreSQL)

Revision ID: 20261125_03
Revises: 20261125_02
Create Date: 2026-11-25 19:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261125_03"
down_revision: str | None = "20261125_02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Called by the dose write itself (one autocommitted statement): takes the coupons' advisory locks (held to
# the statement's end), then checks that the doses on file and the keys answered are still what the rules
# were applied to. PL/pgSQL on purpose: in READ COMMITTED each query of a volatile function sees what was
# committed before it started, so the check sees a dose committed while this call waited on a lock (the
# calling statement's own snapshot is older than the wait).
CREATE = """
CREATE OR REPLACE FUNCTION records_doses_unchanged(
    lock_keys bigint[], municipalities varchar[], coupon_numbers varchar[], seen varchar[],
    key_scope varchar, answered varchar[]
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- unnest keeps the array's order: the locks are taken in the (sorted) order given, so no deadlock.
    PERFORM pg_advisory_xact_lock(k) FROM unnest(lock_keys) AS k;
    IF EXISTS (
        SELECT 1 FROM doses d JOIN unnest(municipalities, coupon_numbers) AS w(m, n)
            ON d.municipality_code = w.m AND d.coupon_number = w.n
         WHERE NOT d.voided AND NOT (d.dose_id = ANY(seen))
    ) THEN
        RETURN false;
    END IF;
    IF (SELECT count(*) FROM doses WHERE dose_id = ANY(seen) AND NOT voided) <> cardinality(seen) THEN
        RETURN false;
    END IF;
    RETURN NOT EXISTS (SELECT 1 FROM idempotency_keys WHERE scope = key_scope AND key = ANY(answered));
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION IF EXISTS records_doses_unchanged(bigint[], varchar[], varchar[], varchar[], varchar, varchar[])"
        )
