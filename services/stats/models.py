"""stats tables (``MainBase``): the aggregates and the consumer's bookkeeping, all in one database.

The bookkeeping lives beside the aggregates on purpose: an event's effect, its id and the consumer's new
position are committed in one transaction, so a crash can neither count an event twice nor lose one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


# Every dimension of a cell (shared.events.StatsCell), as a column.
def _dimension(name: str) -> Column[Any]:
    columns: dict[str, Column[Any]] = {
        "date": Column("date", Date, primary_key=True),  # 接種日
        "prefecture": Column("prefecture", String(2), primary_key=True),  # of the issuing municipality
        # issuing municipality (接種券の発行自治体)
        "municipality": Column("municipality", String(6), primary_key=True),
        "sex": Column("sex", String(1), primary_key=True),  # M, F or U
        "age_band": Column("age_band", String(3), primary_key=True),  # -64, 65- or UNK
        # 0-9 … 90- or UNK (shared.domain.age.AgeBand10); UNK for events from before records sent it.
        "age_band_10": Column("age_band_10", String(5), primary_key=True, server_default="UNK"),
        "medical_worker": Column("medical_worker", Boolean, primary_key=True),  # 医療従事者等
        "dose_number": Column("dose_number", SmallInteger, primary_key=True),  # 接種回数
        "vaccine": Column("vaccine", String(32), primary_key=True),  # product code
    }
    return columns[name]


CELL_DIMENSIONS = (
    "date", "prefecture", "municipality", "sex", "age_band", "age_band_10", "medical_worker", "dose_number", "vaccine"
)  # fmt: skip

# Rollups: the same counts summed over some dimensions, kept in the transaction that changes the cells, so a
# cut that does not need the fine dimensions reads a few hundred or thousand rows instead of every cell (the
# dashboard's cuts over all days read as few rows as over one). Smallest first: a cut reads the first one
# that has every dimension it groups or filters by (services.stats.repository.table_for). The order of the
# dimensions is the primary key's: filters by prefecture lead where they are common.
ROLLUPS: dict[str, tuple[str, ...]] = {
    "dose_totals_by_date": ("date", "dose_number"),
    "dose_totals_by_prefecture": ("prefecture", "dose_number", "sex", "age_band", "age_band_10", "medical_worker"),
    "dose_totals_by_prefecture_date": ("prefecture", "date", "dose_number"),
    # The open data's cells (and the 10-year band): the export reads these.
    "dose_totals_by_cell": ("date", "prefecture", "sex", "age_band", "age_band_10", "medical_worker", "dose_number"),
}


def counts_table(name: str, metadata: MetaData) -> Table:
    """The aggregates' shape, under ``name``: the live table, or a rebuild's shadow beside it."""
    return Table(
        name,
        metadata,
        *(_dimension(d) for d in CELL_DIMENSIONS),
        Column("count", BigInteger, nullable=False),
        # National users cut by municipality; the primary key leads with the date and cannot serve that.
        Index(f"ix_{name}_municipality_date", "municipality", "date"),
    )


def rollup_table(name: str, dimensions: tuple[str, ...], metadata: MetaData) -> Table:
    return Table(name, metadata, *(_dimension(d) for d in dimensions), Column("count", BigInteger, nullable=False))


@dataclass(frozen=True)
class Aggregates:
    """The cells and their rollups: the live tables, or a rebuild's shadows (``suffix``)."""

    counts: Table
    rollups: tuple[Table, ...]  # smallest first

    @classmethod
    def named(cls, metadata: MetaData, suffix: str = "") -> Aggregates:
        return cls(
            counts=counts_table(f"dose_counts{suffix}", metadata),
            rollups=tuple(rollup_table(f"{name}{suffix}", dims, metadata) for name, dims in ROLLUPS.items()),
        )

    @property
    def tables(self) -> tuple[Table, ...]:
        return (self.counts, *self.rollups)


# One row per statistics cell (every dimension of ``shared.events.StatsCell``). Rows are never deleted: a
# cell that drops to zero stays at zero, and readers only show cells above zero.
LIVE = Aggregates.named(MainBase.metadata)
dose_counts = LIVE.counts

# Grows by one in every transaction that changes the aggregates (a consumer's batch, a rebuild's swap), in
# that transaction: answers cached under a version are never older than it (services.stats.service).
aggregates_version = Table(
    "aggregates_version",
    MainBase.metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),  # always 1
    Column("version", BigInteger, nullable=False),
)

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
