"""records_writes_unchanged(): the dose write's check for several requests' writes in one statement (PostgreSQL)

Concurrent single doses of one shard are written together (see ``DoseRepository.record``): one statement, one
commit, for the requests that arrived while the previous write was in flight. Each request ("member", numbered
from 0) keeps the check it had alone (``records_doses_unchanged``, migrations 20261125_12 and 20261126_01):
under its coupons' locks, the doses on file and the keys answered must still be what it read. This function
takes every member's locks in one sorted order (as a batch does: no deadlock) and returns the members whose
check passed; the statement stores the rows of those members only, so a member refused stores nothing and reads
and decides again, as it would alone. The members of one statement share no coupon and no key (the caller
sees to it), so one member's rows can never be what another's check finds.

Each query is an index probe per wanted coupon, dose or key whatever the generic plan guesses of the arrays
(``LATERAL … LIMIT 1``, as in records_doses_unchanged); ``tests/integration/services/records/test_records_plans.py``
explains them.

Revision ID: 20261126_02
Revises: 20261126_01
Create Date: 2026-11-26 10:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261126_02"
down_revision: str | None = "20261126_01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Members with a dose on file of one of their coupons that they did not read (another request's, since).
OTHER_DOSES = """
SELECT w.g FROM unnest(coupon_members, municipalities, coupon_numbers) AS w(g, m, n)
CROSS JOIN LATERAL (
    SELECT 1 FROM doses d
     WHERE d.municipality_code = w.m AND d.coupon_number = w.n AND NOT d.voided AND NOT (d.dose_id = ANY(seen))
     LIMIT 1
) AS other
"""
# Members with a dose they read that is gone or voided since.
SEEN_GONE = """
SELECT s.g FROM unnest(seen_members, seen) AS s(g, id)
LEFT JOIN LATERAL (SELECT 1 AS one FROM doses d WHERE d.dose_id = s.id AND NOT d.voided LIMIT 1) AS found ON true
WHERE found.one IS NULL
"""
# Members with a key answered since they read.
KEYS_ANSWERED = """
SELECT a.g FROM unnest(key_members, key_scopes, answered) AS a(g, scope, k)
CROSS JOIN LATERAL (SELECT 1 FROM idempotency_keys i WHERE i.scope = a.scope AND i.key = a.k LIMIT 1) AS found
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
    RETURN ARRAY(
        SELECT g FROM generate_series(0, members - 1) AS g
        EXCEPT ({OTHER_DOSES} UNION {SEEN_GONE} UNION {KEYS_ANSWERED})
        ORDER BY 1
    );
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION IF EXISTS records_writes_unchanged("
            "integer, bigint[], integer[], varchar[], varchar[], integer[], varchar[], integer[], varchar[], varchar[])"
        )
