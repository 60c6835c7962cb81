"""stats tables (``MainBase``): the aggregates and the consumer's bookkeeping, all in one database.

The bookkeeping lives beside the aggregates on purpose: an event's effect, its id and the consumer's new
position are committed in one transaction, so a crash can neither count an event twice nor lose one.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Index,
    MetaData,
    SmallInteger,
    String,
    Table,
)
from sqlalchemy.orm import DeclarativeBase

from shared.consumer import consumer_tables


class MainBase(DeclarativeBase):
    metadata = MetaData()


def counts_table(name: str, metadata: MetaData) -> Table:
    """The aggregates' shape, under ``name``: the live table, or a rebuild's shadow beside it."""
    return Table(
        name,
        metadata,
        Column("date", Date, primary_key=True),  # 接種日
        Column("prefecture", String(2), primary_key=True),  # of the issuing municipality
        Column("municipality", String(6), primary_key=True),  # issuing municipality (接種券の発行自治体)
        Column("sex", String(1), primary_key=True),  # M, F or U
        Column("age_band", String(3), primary_key=True),  # -64, 65- or UNK
        # 0-9 … 90- or UNK (shared.domain.age.AgeBand10); UNK for events from before records sent it.
        Column("age_band_10", String(5), primary_key=True, server_default="UNK"),
        Column("medical_worker", Boolean, primary_key=True),  # 医療従事者等
        Column("dose_number", SmallInteger, primary_key=True),  # 接種回数
        Column("vaccine", String(32), primary_key=True),  # product code
        Column("count", BigInteger, nullable=False),
        # National users cut by municipality; the primary key leads with the date and cannot serve that.
        Index(f"ix_{name}_municipality_date", "municipality", "date"),
    )


# One row per statistics cell (every dimension of ``shared.events.StatsCell``). Rows are never deleted: a
# cell that drops to zero stays at zero, and readers only show cells above zero.
dose_counts = counts_table("dose_counts", MainBase.metadata)

# Which events a consumer has applied (the primary key makes a redelivered event a no-op; where each was
# read lets old ids be pruned) and the next offset per partition, only ever written in the transaction that
# applied the messages: the project's idempotent consumer's bookkeeping (shared.consumer).
consumer_bookkeeping = consumer_tables(MainBase.metadata, positions=True)
processed_events, consumer_offsets = consumer_bookkeeping

# When the aggregates last changed (the API's ``as_of``) and the newest event time seen.
consumer_state = Table(
    "consumer_state",
    MainBase.metadata,
    Column("consumer", String(64), primary_key=True),
    Column("last_event_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
