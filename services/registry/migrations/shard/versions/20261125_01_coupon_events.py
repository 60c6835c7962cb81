"""coupons and the outbox of coupon-events

Every coupon number a resident holds gets a row in ``coupons`` and a ``coupon.issued`` event in the
outbox, so that records' coupon projection learns about residents registered before coupon events existed.

Revision ID: 20261125_01
Revises: 20261124_01
Create Date: 2026-11-25 10:00:00
"""

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "20261125_01"
down_revision: str | None = "20261124_01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    coupons = op.create_table(
        "coupons",
        sa.Column("municipality_code", sa.String(length=6), nullable=False),
        sa.Column("coupon_number", sa.String(length=10), nullable=False),
        sa.Column("resident_id", sa.String(length=64), nullable=False),
        sa.Column("sex", sa.String(length=1), nullable=False),
        sa.Column("birth_date", sa.Date(), nullable=True),
        sa.Column("invalid_from", sa.Date(), nullable=True),
        sa.Column("invalid_reason", sa.String(length=16), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("municipality_code", "coupon_number"),
    )
    op.create_index("ix_coupons_resident", "coupons", ["municipality_code", "resident_id"])
    outbox = op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("key", sa.String(length=6), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_outbox_unpublished", "outbox", ["published_at", "id"])

    now = datetime.now(UTC)
    rows = op.get_bind().execute(
        sa.text(
            "SELECT municipality_code, resident_id, sex, birth_date, coupon_number FROM residents "
            "WHERE coupon_number IS NOT NULL ORDER BY municipality_code, resident_id"
        )
    )
    coupon_rows, events = [], []
    for municipality, resident_id, sex, birth_date, coupon_number in rows:
        birth = birth_date if birth_date is None or isinstance(birth_date, str) else birth_date.isoformat()
        coupon_rows.append(
            {
                "municipality_code": municipality,
                "coupon_number": coupon_number,
                "resident_id": resident_id,
                "sex": sex,
                "birth_date": birth_date,
                "invalid_from": None,
                "invalid_reason": None,
                "version": 1,
                "created_at": now,
                "updated_at": now,
            }
        )
        event_id = str(uuid.uuid4())
        payload = {
            "schema_version": 1,
            "event_id": event_id,
            "type": "coupon.issued",
            "occurred_at": now.isoformat(),
            "municipality": municipality,
            "coupon_number": coupon_number,
            "version": 1,
            "state": {
                "resident_id": resident_id,
                "sex": sex,
                "birth_date": birth,
                "invalid_from": None,
                "invalid_reason": None,
            },
        }
        events.append(
            {"event_id": event_id, "key": municipality, "payload": json.dumps(payload).encode(), "created_at": now}
        )
    if coupon_rows:
        op.bulk_insert(coupons, coupon_rows)
        op.bulk_insert(outbox, events)


def downgrade() -> None:
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_coupons_resident", table_name="coupons")
    op.drop_table("coupons")
