"""All of stats' SQL.

Queries are built from the whitelist below: a caller names dimensions, never columns or SQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Row,
    Select,
    Table,
    and_,
    case,
    cast,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from services.stats.models import consumer_offsets, consumer_state, dose_counts, processed_events
from shared.db import upsert
from shared.domain.age import AgeBand10
from shared.events import StatsCell

Dimension = Literal[
    "date", "prefecture", "municipality", "sex", "age_band", "age_band_10", "medical_worker", "dose_number", "vaccine"
]
DIMENSIONS: tuple[Dimension, ...] = get_args(Dimension)

# A result row of any shape (SQLAlchemy 2.1 types rows by their column types).
AnyRow = Row[*tuple[Any, ...]]

_c = dose_counts.c
_COLUMNS: dict[Dimension, Column[Any]] = {name: _c[name] for name in DIMENSIONS}
_CELL_KEY = [column.name for column in dose_counts.primary_key.columns]

# Explicit ranks instead of string order, so the result does not depend on a PostgreSQL collation
# (the open-data files must come out byte-identical on every database).
_SEX_RANKS = {"F": 0, "M": 1, "U": 2}
_AGE_RANKS = {"-64": 0, "65-": 1, "UNK": 2}
_SEX_RANK = case(_SEX_RANKS, value=_c.sex, else_=3)
_AGE_RANK = case(_AGE_RANKS, value=_c.age_band, else_=3)
# Youngest first, unknown last ("10-19" would sort before "0-9" as a string).
_AGE_10_RANKS = {band.value: rank for rank, band in enumerate(AgeBand10)}
_RANKS: dict[str, dict[str, int]] = {"sex": _SEX_RANKS, "age_band": _AGE_RANKS, "age_band_10": _AGE_10_RANKS}

# Dimensions finer than the open data, which the Digital Agency publishes at full detail by prefecture
# (date × prefecture × sex × age band × medical worker × dose number): a cut by any of them is a fine cut.
# Summing them away from any cell gives a cell no finer than the published ones.
FINE_DIMENSIONS: frozenset[Dimension] = frozenset({"municipality", "vaccine", "age_band_10"})

_SUM = func.sum(_c.count)
_TOTAL = cast(_SUM, BigInteger)  # PostgreSQL sums a bigint to numeric


def _order_keys(name: Dimension, columns: Any = None) -> list[ColumnElement[Any]]:
    """Sort keys of a dimension, on the counts table or on ``columns`` (a subquery's) of the same names."""
    column = _COLUMNS[name] if columns is None else columns[name]
    ranks = _RANKS.get(name)
    if ranks is None:
        return [column]
    return [case(ranks, value=column, else_=len(ranks)), column]


@dataclass(frozen=True, slots=True)
class DoseFilter:
    """Which cells a cut covers; every field optional. Dates are inclusive."""

    date_from: date | None = None
    date_to: date | None = None
    prefecture: str | None = None
    municipality: str | None = None

    def clauses(self) -> list[ColumnElement[bool]]:
        out: list[ColumnElement[bool]] = []
        if self.date_from is not None:
            out.append(_c.date >= self.date_from)
        if self.date_to is not None:
            out.append(_c.date <= self.date_to)
        if self.prefecture is not None:
            out.append(_c.prefecture == self.prefecture)
        if self.municipality is not None:
            out.append(_c.municipality == self.municipality)
        return out


class StatsRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def as_of(self) -> datetime | None:
        moment: datetime | None = await self.session.scalar(select(func.max(consumer_state.c.updated_at)))
        return moment

    async def total(self, where: DoseFilter) -> int:
        value = await self.session.scalar(select(func.coalesce(_TOTAL, 0)).where(*where.clauses()))
        return int(value or 0)

    async def grouped_counts(self, group_by: Sequence[Dimension], where: DoseFilter) -> Sequence[AnyRow]:
        """Rows of (the group_by values in order..., count), count > 0, sorted by the values."""
        columns = [_COLUMNS[name] for name in group_by]
        stmt = (
            select(*columns, _TOTAL.label("count"))
            .where(*where.clauses())
            .group_by(*columns)
            .having(_SUM > 0)
            .order_by(*(key for name in group_by for key in _order_keys(name)))
        )
        return (await self.session.execute(stmt)).all()

    def cut_statement(
        self,
        group_by: Sequence[Dimension],
        where: DoseFilter,
        *,
        suppress_below: int = 0,
        limit: int | None = None,
        offset: int = 0,
    ) -> Select[Any]:
        """Rows of (the group_by values..., count), count > 0, sorted by the values; one page of them.

        With ``suppress_below`` (a public fine cut), a count from 1 to ``suppress_below - 1`` comes back as
        NULL, and so does the smallest other count of a group of cells that adds up to a published total
        when exactly one cell of that group is small (else the total minus the others would give it away).
        The group is every cell with the same values but for the fine dimensions (municipality, vaccine,
        10-year age band), within a prefecture.
        A municipality filter is applied only after the decision, so asking for one municipality hides
        exactly what the grouped cut hides.
        """
        if not suppress_below:
            columns = [_COLUMNS[name] for name in group_by]
            stmt = (
                select(*columns, _TOTAL.label("count"))
                .where(*where.clauses())
                .group_by(*columns)
                .having(_SUM > 0)
                .order_by(*(key for name in group_by for key in _order_keys(name)))
            )
            return stmt.limit(limit).offset(offset) if limit is not None else stmt
        fine_municipality = "municipality" in group_by or where.municipality is not None
        inner_dims: list[Dimension] = list(group_by)
        if fine_municipality:
            inner_dims += [d for d in ("municipality", "prefecture") if d not in inner_dims]
        inner_where = where
        if where.municipality is not None:
            # Decide over the whole prefecture; keep the one municipality asked for afterwards.
            if where.prefecture not in (None, where.municipality[:2]):
                inner_where = DoseFilter(date_from=where.date_from, date_to=where.date_to, prefecture="--")
            else:
                inner_where = DoseFilter(
                    date_from=where.date_from, date_to=where.date_to, prefecture=where.municipality[:2]
                )
        inner_columns = [_COLUMNS[name] for name in inner_dims]
        cut = (
            select(*inner_columns, _TOTAL.label("count"))
            .where(*inner_where.clauses())
            .group_by(*inner_columns)
            .having(_SUM > 0)
            .cte("cut")
        )
        small = case((cut.c["count"] < suppress_below, 1), else_=0)
        partition = [cut.c[name] for name in inner_dims if name not in FINE_DIMENSIONS]
        marked = select(
            cut,
            small.label("small"),
            func.sum(small).over(partition_by=partition or None).label("smalls"),
            func.row_number()
            .over(partition_by=[*partition, small], order_by=[cut.c["count"], *(cut.c[n] for n in inner_dims)])
            .label("rank"),
        ).subquery("marked")
        m = marked.c
        hidden = or_(m.small == 1, and_(m.smalls == 1, m.small == 0, m.rank == 1))
        stmt = select(*(m[name] for name in group_by), case((hidden, None), else_=m["count"]).label("count"))
        if where.municipality is not None:
            stmt = stmt.where(m.municipality == where.municipality)
        stmt = stmt.order_by(*(key for name in group_by for key in _order_keys(name, m)))
        return stmt.limit(limit).offset(offset) if limit is not None else stmt

    async def stream_rows(self, stmt: Select[Any], *, chunk_rows: int) -> AsyncIterator[Sequence[AnyRow]]:
        result = await self.session.stream(stmt.execution_options(yield_per=chunk_rows))
        async for rows in result.partitions(chunk_rows):
            yield rows

    async def people_by_dose(self, *, prefecture: str | None, by_prefecture: bool) -> Sequence[AnyRow]:
        """Rows of ([prefecture,] dose_number, people, people_65_and_over), net of corrections and voids.

        A cell's count is the number of live doses in it, and each person has at most one live dose of a
        given number (records refuses a second one), so a sum over dose_number = N is a count of people.
        """
        keys: list[Column[Any]] = ([_c.prefecture] if by_prefecture else []) + [_c.dose_number]
        senior = cast(func.sum(case((_c.age_band == "65-", _c.count), else_=0)), BigInteger)
        stmt = select(*keys, _TOTAL.label("people"), senior.label("people_65_and_over")).group_by(*keys).order_by(*keys)
        if prefecture is not None:
            stmt = stmt.where(_c.prefecture == prefecture)
        return (await self.session.execute(stmt)).all()

    async def prefecture_cells(self, *, chunk_rows: int) -> AsyncIterator[Sequence[AnyRow]]:
        """The open data's cells (municipality and vaccine summed away) in the published order, streamed.

        Rows: date, prefecture, sex, age_band, medical_worker, dose_number, doses.
        """
        keys = [_c.date, _c.prefecture, _c.sex, _c.age_band, _c.medical_worker, _c.dose_number]
        stmt = (
            select(*keys, _TOTAL.label("doses"))  # not "count": a row is a tuple, and tuples have .count()
            .group_by(*keys)
            .having(_SUM > 0)
            .order_by(
                _c.date, _c.prefecture, _SEX_RANK, _c.sex, _AGE_RANK, _c.age_band, _c.medical_worker, _c.dose_number
            )
            .execution_options(yield_per=chunk_rows)
        )
        result = await self.session.stream(stmt)
        async for rows in result.partitions(chunk_rows):
            yield rows

    async def general_doses_by_date(self, *, chunk_rows: int) -> AsyncIterator[Sequence[AnyRow]]:
        """Per date: (date, first, second) doses of non-medical-workers, dates with either above zero."""
        first = func.sum(case((_c.dose_number == 1, _c.count), else_=0))
        second = func.sum(case((_c.dose_number == 2, _c.count), else_=0))
        stmt = (
            select(_c.date, cast(first, BigInteger).label("first"), cast(second, BigInteger).label("second"))
            .where(_c.medical_worker.is_(False), _c.dose_number.in_((1, 2)))
            .group_by(_c.date)
            .having(or_(first > 0, second > 0))
            .order_by(_c.date)
            .execution_options(yield_per=chunk_rows)
        )
        result = await self.session.stream(stmt)
        async for rows in result.partitions(chunk_rows):
            yield rows


class ConsumerRepository:
    """The consumer's writes to the aggregates (its bookkeeping is :class:`shared.consumer.Bookkeeping`'s).

    Each call is one statement; the caller's transaction holds them together.

    ``counts`` is the aggregates table written to: the live one, or a rebuild's shadow.
    """

    def __init__(self, session: AsyncSession, *, counts: Table = dose_counts) -> None:
        self.session = session
        self.counts = counts

    async def add_to_counts(self, deltas: Mapping[StatsCell, int]) -> None:
        """``count += delta`` per cell, creating cells on first sight."""
        if not deltas:
            return
        # One fixed order for every writer, so two consumers touching the same cells cannot deadlock.
        cells = sorted(deltas, key=_cell_sort_key)
        stmt = upsert(self.session, self.counts)
        stmt = stmt.on_conflict_do_update(
            index_elements=_CELL_KEY, set_={"count": self.counts.c["count"] + stmt.excluded["count"]}
        )
        await self.session.execute(stmt, [{**_cell_values(cell), "count": deltas[cell]} for cell in cells])

    async def store_state(self, consumer: str, *, last_event_at: datetime, updated_at: datetime) -> None:
        stmt = upsert(self.session, consumer_state).values(
            consumer=consumer, last_event_at=last_event_at, updated_at=updated_at
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["consumer"],
            set_={"last_event_at": stmt.excluded.last_event_at, "updated_at": stmt.excluded.updated_at},
        )
        await self.session.execute(stmt)


def _cell_values(cell: StatsCell) -> dict[str, Any]:
    return {
        "date": cell.date,
        "prefecture": cell.prefecture,
        "municipality": cell.municipality,
        "sex": cell.sex,
        "age_band": cell.age_band.value,
        "age_band_10": cell.age_band_10.value,
        "medical_worker": cell.medical_worker,
        "dose_number": cell.dose_number,
        "vaccine": cell.vaccine,
    }


def _cell_sort_key(cell: StatsCell) -> tuple[Any, ...]:
    return tuple(_cell_values(cell).values())


class RebuildRepository:
    """A rebuild's DDL and bookkeeping: a shadow aggregates table filled beside the live one, then swapped in."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def _dialect(self) -> str:
        return self.session.get_bind().dialect.name

    async def prepare(self, shadow: Table, consumer: str) -> None:
        """An empty shadow table and no bookkeeping under ``consumer``: a rebuild starts from offset 0."""
        connection = await self.session.connection()
        await connection.run_sync(lambda sync: shadow.drop(sync, checkfirst=True))
        await connection.run_sync(lambda sync: shadow.create(sync))
        for table in (processed_events, consumer_offsets, consumer_state):
            await self.session.execute(delete(table).where(table.c.consumer == consumer))

    async def lock_writers(self) -> None:
        """Hold off the live consumers until this transaction ends.

        Their batch transaction writes ``processed_events`` first, so they wait here before touching the
        aggregates, and then find the swapped-in table. (SQLite has one writer at a time anyway.)
        """
        if self._dialect() == "postgresql":
            await self.session.execute(text("LOCK TABLE processed_events IN EXCLUSIVE MODE"))

    async def swap(self, shadow: Table, *, live: str, rebuilt: str, topic: str, now: datetime) -> None:
        """Replace the live aggregates with the shadow's, and the live consumer's bookkeeping with the rebuild's."""
        live_name, shadow_name = dose_counts.name, shadow.name
        statements = [f"DROP TABLE {live_name}", f"ALTER TABLE {shadow_name} RENAME TO {live_name}"]
        if self._dialect() == "postgresql":
            statements += [
                f"ALTER INDEX {shadow_name}_pkey RENAME TO {live_name}_pkey",
                f"ALTER INDEX ix_{shadow_name}_municipality_date RENAME TO ix_{live_name}_municipality_date",
            ]
        else:  # SQLite cannot rename an index
            statements += [
                f"DROP INDEX ix_{shadow_name}_municipality_date",
                f"CREATE INDEX ix_{live_name}_municipality_date ON {live_name} (municipality, date)",
            ]
        for statement in statements:
            await self.session.execute(text(statement))
        p, o, s = processed_events, consumer_offsets, consumer_state
        await self.session.execute(delete(p).where(p.c.consumer == live))
        await self.session.execute(update(p).where(p.c.consumer == rebuilt).values(consumer=live))
        await self.session.execute(delete(o).where(o.c.consumer == live, o.c.topic == topic))
        await self.session.execute(update(o).where(o.c.consumer == rebuilt).values(consumer=live))
        last_event_at = await self.session.scalar(select(s.c.last_event_at).where(s.c.consumer == rebuilt))
        await self.session.execute(delete(s).where(s.c.consumer.in_((live, rebuilt))))
        # as_of moves to now: the aggregates changed (if only in their history).
        await self.session.execute(insert(s).values(consumer=live, last_event_at=last_event_at, updated_at=now))
