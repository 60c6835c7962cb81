"""All of stats' SQL.

Queries are built from the whitelist below: a caller names dimensions, never columns or SQL.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
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
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.stats.models import (
    CELL_DIMENSIONS,
    LIVE,
    Aggregates,
    aggregates_version,
    consumer_offsets,
    consumer_state,
    dose_counts,
    processed_events,
)
from shared.db import pg_array_type, upsert, upsert_many
from shared.domain.age import AgeBand10
from shared.events import StatsCell

Dimension = Literal[
    "date", "prefecture", "municipality", "sex", "age_band", "age_band_10", "medical_worker", "dose_number", "vaccine"
]
DIMENSIONS: tuple[Dimension, ...] = get_args(Dimension)

# A result row of any shape (SQLAlchemy 2.1 types rows by their column types).
AnyRow = Row[*tuple[Any, ...]]

_CELL_KEY = [column.name for column in dose_counts.primary_key.columns]

# Explicit ranks instead of string order, so the result does not depend on a PostgreSQL collation
# (the open-data files must come out byte-identical on every database).
_SEX_RANKS = {"F": 0, "M": 1, "U": 2}
_AGE_RANKS = {"-64": 0, "65-": 1, "UNK": 2}
# Youngest first, unknown last ("10-19" would sort before "0-9" as a string).
_AGE_10_RANKS = {band.value: rank for rank, band in enumerate(AgeBand10)}
_RANKS: dict[str, dict[str, int]] = {"sex": _SEX_RANKS, "age_band": _AGE_RANKS, "age_band_10": _AGE_10_RANKS}

# Dimensions finer than the open data, which the Digital Agency publishes at full detail by prefecture
# (date × prefecture × sex × age band × medical worker × dose number): a cut by any of them is a fine cut.
# Summing them away from any cell gives a cell no finer than the published ones.
FINE_DIMENSIONS: frozenset[Dimension] = frozenset({"municipality", "vaccine", "age_band_10"})


def dimensions_of(table: Table) -> frozenset[str]:
    return frozenset(column.name for column in table.primary_key.columns)


def table_for(needed: Iterable[str], aggregates: Aggregates = LIVE) -> Table:
    """The smallest table of ``aggregates`` that has every dimension in ``needed``: a rollup, else the cells."""
    wanted = set(needed)
    for table in aggregates.rollups:
        if wanted <= dimensions_of(table):
            return table
    return aggregates.counts


_VERSION = select(
    select(aggregates_version.c.version).where(aggregates_version.c.id == 1).scalar_subquery(),
    select(func.max(consumer_state.c.updated_at)).scalar_subquery(),
)


async def read_version(engine: AsyncEngine) -> tuple[int, datetime | None]:
    """(the aggregates' version, as_of): what a cached answer is keyed by.

    One statement outside a transaction: a cached answer then costs a single round trip (no BEGIN, no
    ROLLBACK), and a single statement sees one snapshot anyway.
    """
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        row = (await autocommit.execute(_VERSION)).one()
    return int(row[0] or 0), row[1]


def _total(table: Table) -> ColumnElement[Any]:
    return cast(func.sum(table.c["count"]), BigInteger)  # PostgreSQL sums a bigint to numeric


def _order_keys(name: str, columns: Any) -> list[ColumnElement[Any]]:
    """Sort keys of a dimension on ``columns`` (a table's or a subquery's ``.c``)."""
    column = columns[name]
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

    def dimensions(self) -> set[str]:
        """The dimensions a table needs to apply this filter."""
        out = set()
        if self.date_from is not None or self.date_to is not None:
            out.add("date")
        if self.prefecture is not None:
            out.add("prefecture")
        if self.municipality is not None:
            out.add("municipality")
        return out

    def clauses(self, table: Table) -> list[ColumnElement[bool]]:
        c = table.c
        out: list[ColumnElement[bool]] = []
        if self.date_from is not None:
            out.append(c.date >= self.date_from)
        if self.date_to is not None:
            out.append(c.date <= self.date_to)
        if self.prefecture is not None:
            out.append(c.prefecture == self.prefecture)
        if self.municipality is not None:
            out.append(c.municipality == self.municipality)
        return out


def _grouped(table: Table, group_by: Sequence[str], where: DoseFilter) -> Select[Any]:
    """(the group_by values..., count) of ``table``, count > 0, sorted by the values."""
    columns = [table.c[name] for name in group_by]
    return (
        select(*columns, _total(table).label("count"))
        .where(*where.clauses(table))
        .group_by(*columns)
        .having(func.sum(table.c["count"]) > 0)
        .order_by(*(key for name in group_by for key in _order_keys(name, table.c)))
    )


class StatsRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def total(self, where: DoseFilter) -> int:
        table = table_for(where.dimensions())
        value = await self.session.scalar(select(func.coalesce(_total(table), 0)).where(*where.clauses(table)))
        return int(value or 0)

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

        Read from the smallest rollup that has the dimensions the cut groups and filters by.

        With ``suppress_below`` (a public fine cut), a count from 1 to ``suppress_below - 1`` comes back as
        NULL, and so does the smallest other count of a group of cells that adds up to a published total
        when exactly one cell of that group is small (else the total minus the others would give it away).
        The group is every cell with the same values but for the fine dimensions (municipality, vaccine,
        10-year age band), within a prefecture.
        A municipality filter is applied only after the decision, so asking for one municipality hides
        exactly what the grouped cut hides.
        """
        if not suppress_below:
            stmt = _grouped(table_for({*group_by, *where.dimensions()}), group_by, where)
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
        table = table_for({*inner_dims, *inner_where.dimensions()})
        inner_columns = [table.c[name] for name in inner_dims]
        cut = (
            select(*inner_columns, _total(table).label("count"))
            .where(*inner_where.clauses(table))
            .group_by(*inner_columns)
            .having(func.sum(table.c["count"]) > 0)
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
        shown: Select[Any] = select(
            *(m[name] for name in group_by), case((hidden, None), else_=m["count"]).label("count")
        )
        if where.municipality is not None:
            shown = shown.where(m.municipality == where.municipality)
        shown = shown.order_by(*(key for name in group_by for key in _order_keys(name, m)))
        return shown.limit(limit).offset(offset) if limit is not None else shown

    async def stream_rows(self, stmt: Select[Any], *, chunk_rows: int) -> AsyncIterator[Sequence[AnyRow]]:
        result = await self.session.stream(stmt.execution_options(yield_per=chunk_rows))
        async for rows in result.partitions(chunk_rows):
            yield rows

    async def people_by_dose(self, *, prefecture: str | None, by_prefecture: bool) -> Sequence[AnyRow]:
        """Rows of ([prefecture,] dose_number, people, people_65_and_over), net of corrections and voids.

        A cell's count is the number of live doses in it, so a sum over dose_number = N counts people as long as
        each has at most one live dose N: records stores nothing for a double scan, but keeps a different second
        record of a dose number for review (``duplicate_dose``), counted until the municipality voids one.
        """
        t = table_for({"prefecture", "dose_number", "age_band"})
        keys: list[Column[Any]] = ([t.c.prefecture] if by_prefecture else []) + [t.c.dose_number]
        senior = cast(func.sum(case((t.c.age_band == "65-", t.c["count"]), else_=0)), BigInteger)
        stmt = (
            select(*keys, _total(t).label("people"), senior.label("people_65_and_over")).group_by(*keys).order_by(*keys)
        )
        if prefecture is not None:
            stmt = stmt.where(t.c.prefecture == prefecture)
        return (await self.session.execute(stmt)).all()

    async def prefecture_cells(self, *, chunk_rows: int) -> AsyncIterator[Sequence[AnyRow]]:
        """The open data's cells (municipality and vaccine summed away) in the published order, streamed.

        Rows: date, prefecture, sex, age_band, medical_worker, dose_number, doses.
        """
        names = ["date", "prefecture", "sex", "age_band", "medical_worker", "dose_number"]
        t = table_for(names)
        keys = [t.c[name] for name in names]
        stmt = (
            select(*keys, _total(t).label("doses"))  # not "count": a row is a tuple, and tuples have .count()
            .group_by(*keys)
            .having(func.sum(t.c["count"]) > 0)
            .order_by(*(key for name in names for key in _order_keys(name, t.c)))
            .execution_options(yield_per=chunk_rows)
        )
        result = await self.session.stream(stmt)
        async for rows in result.partitions(chunk_rows):
            yield rows

    async def general_doses_by_date(self, *, chunk_rows: int) -> AsyncIterator[Sequence[AnyRow]]:
        """Per date: (date, first, second) doses of non-medical-workers, dates with either above zero."""
        t = table_for({"date", "medical_worker", "dose_number"})
        first = func.sum(case((t.c.dose_number == 1, t.c["count"]), else_=0))
        second = func.sum(case((t.c.dose_number == 2, t.c["count"]), else_=0))
        stmt = (
            select(t.c.date, cast(first, BigInteger).label("first"), cast(second, BigInteger).label("second"))
            .where(t.c.medical_worker.is_(False), t.c.dose_number.in_((1, 2)))
            .group_by(t.c.date)
            .having(or_(first > 0, second > 0))
            .order_by(t.c.date)
            .execution_options(yield_per=chunk_rows)
        )
        result = await self.session.stream(stmt)
        async for rows in result.partitions(chunk_rows):
            yield rows


class ConsumerRepository:
    """The consumer's writes to the aggregates (its bookkeeping is :class:`shared.consumer.Bookkeeping`'s).

    The caller's transaction holds the statements together. ``aggregates`` are the tables written to: the
    live ones, or a rebuild's shadows.
    """

    def __init__(self, session: AsyncSession, *, aggregates: Aggregates = LIVE) -> None:
        self.session = session
        self.aggregates = aggregates

    async def add_to_counts(self, deltas: Mapping[StatsCell, int], *, state: ConsumerState | None = None) -> None:
        """``count += delta`` per cell and per rollup row, creating rows on first sight; the version grows; and
        the consumer's ``state`` stored when given.

        PostgreSQL: one statement for all of it (:func:`_apply_statement`): a batch of single doses costs its
        consumer few round trips, whatever number of tables it keeps. Elsewhere one statement a table, the
        finest table first and the coarsest rollup last: its few rows are the ones every batch touches, so
        they stay locked for the shortest time before the commit.
        """
        rows = [{**_cell_values(cell), "count": delta} for cell, delta in deltas.items() if delta]
        if rows and self.session.get_bind().dialect.name == "postgresql":
            await self._apply_in_one(rows, state)
            return
        if rows:
            await self._add(self.aggregates.counts, rows)
            for table in reversed(self.aggregates.rollups):
                await self._add(table, _fold(rows, [column.name for column in table.primary_key.columns]))
            stmt = upsert(self.session, aggregates_version).values(id=1, version=1)
            stmt = stmt.on_conflict_do_update(index_elements=["id"], set_={"version": aggregates_version.c.version + 1})
            await self.session.execute(stmt)
        if state is not None:
            await self.store_state(state.consumer, last_event_at=state.last_event_at, updated_at=state.updated_at)

    async def _apply_in_one(self, rows: list[dict[str, Any]], state: ConsumerState | None) -> None:
        params: dict[str, Any] = {name: [row[name] for row in rows] for name in (*CELL_DIMENSIONS, "count")}
        if state is not None:
            params |= {"consumer": state.consumer, "last_event_at": state.last_event_at, "updated_at": state.updated_at}
        await self.session.execute(_apply_statement(self.aggregates, with_state=state is not None), params)

    async def _add(self, table: Table, rows: list[dict[str, Any]]) -> None:
        key = [column.name for column in table.primary_key.columns]
        # One fixed order for every writer, so two consumers touching the same rows cannot deadlock.
        rows = sorted((r for r in rows if r["count"]), key=operator.itemgetter(*key))
        if not rows:
            return
        stmt, params = upsert_many(self.session, table, rows)
        stmt = stmt.on_conflict_do_update(index_elements=key, set_={"count": table.c["count"] + stmt.excluded["count"]})
        await self.session.execute(stmt, params)

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


def _fold(rows: list[dict[str, Any]], dimensions: list[str]) -> list[dict[str, Any]]:
    """The rows summed over every dimension not in ``dimensions``."""
    sums: dict[tuple[Any, ...], int] = {}
    for row in rows:
        key = tuple(row[d] for d in dimensions)
        sums[key] = sums.get(key, 0) + row["count"]
    return [{**dict(zip(dimensions, key, strict=True)), "count": count} for key, count in sums.items()]


@dataclass(frozen=True)
class ConsumerState:
    """What a consumer's batch stores beside the counts (the API's ``as_of``)."""

    consumer: str
    last_event_at: datetime
    updated_at: datetime


_apply_statements: dict[tuple[str, bool], Any] = {}
_apply_sql_pg: dict[tuple[str, bool], tuple[str, list[str]]] = {}
_STATE_SQL = (
    "INSERT INTO consumer_state (consumer, last_event_at, updated_at) VALUES ({consumer}, {last_event_at}, "
    "{updated_at}) ON CONFLICT (consumer) DO UPDATE SET last_event_at = excluded.last_event_at, "
    "updated_at = excluded.updated_at"
)
_STATE_PARAMS = ("consumer", "last_event_at", "updated_at")


def _apply_sql(aggregates: Aggregates, *, with_state: bool, param: Callable[[str], str]) -> str:
    """PostgreSQL: a batch's cells added to the counts and every rollup, the version grown and (``with_state``)
    the consumer's state stored, in one statement: each table one ``INSERT … SELECT … ON CONFLICT DO UPDATE`` in
    a ``WITH`` of its own, fed by ``unnest`` of one array per dimension; a rollup sums the cells in SQL. Every
    insert takes its rows in key order, and the tables in one order: concurrent consumers cannot deadlock.
    ``param`` writes a parameter's placeholder from its name."""
    cells = aggregates.counts.c
    arrays = ", ".join(f"CAST({param(d)} AS {pg_array_type(cells[d])})" for d in CELL_DIMENSIONS)
    names = ", ".join(CELL_DIMENSIONS)
    parts = [f"cells AS (SELECT * FROM unnest({arrays}, CAST({param('count')} AS BIGINT[])) AS c({names}, count))"]
    for i, table in enumerate((aggregates.counts, *aggregates.rollups)):
        dims = ", ".join(column.name for column in table.primary_key.columns)
        parts.append(
            f"t{i} AS (INSERT INTO {table.name} ({dims}, count) "
            f"SELECT {dims}, sum(count)::bigint FROM cells GROUP BY {dims} HAVING sum(count) <> 0 ORDER BY {dims} "
            f"ON CONFLICT ({dims}) DO UPDATE SET count = {table.name}.count + excluded.count)"
        )
    parts.append(
        "version AS (INSERT INTO aggregates_version (id, version) VALUES (1, 1) "
        "ON CONFLICT (id) DO UPDATE SET version = aggregates_version.version + 1)"
    )
    if with_state:
        parts.append(f"state AS ({_STATE_SQL.format_map({n: param(n) for n in _STATE_PARAMS})})")
    return "WITH " + ",\n".join(parts) + "\nSELECT 1"


def _apply_statement(aggregates: Aggregates, *, with_state: bool) -> Any:
    """:func:`_apply_sql` for a session (named parameters); built once per set of tables (a rebuild's shadows
    have their own)."""
    cache_key = (aggregates.counts.name, with_state)
    if cache_key not in _apply_statements:
        _apply_statements[cache_key] = text(_apply_sql(aggregates, with_state=with_state, param=lambda n: f":{n}"))
    return _apply_statements[cache_key]


def _apply_statement_pg(aggregates: Aggregates, *, with_state: bool) -> tuple[str, list[str]]:
    """:func:`_apply_sql` for asyncpg (``$n``), and the parameters' names in their order; built once."""
    cache_key = (aggregates.counts.name, with_state)
    if cache_key not in _apply_sql_pg:
        order: list[str] = []

        def numbered(name: str) -> str:
            order.append(name)
            return f"${len(order)}"

        _apply_sql_pg[cache_key] = (_apply_sql(aggregates, with_state=with_state, param=numbered), order)
    return _apply_sql_pg[cache_key]


class DriverConsumerRepository:
    """:class:`ConsumerRepository`'s :meth:`~ConsumerRepository.add_to_counts` on an asyncpg connection, in its
    transaction (PostgreSQL; the consumer's batch on the driver itself, see :mod:`shared.consumer`)."""

    def __init__(self, connection: Any, *, aggregates: Aggregates = LIVE) -> None:
        self.connection = connection
        self.aggregates = aggregates

    async def add_to_counts(self, deltas: Mapping[StatsCell, int], *, state: ConsumerState | None = None) -> None:
        """As :meth:`ConsumerRepository.add_to_counts`."""
        rows = [{**_cell_values(cell), "count": delta} for cell, delta in deltas.items() if delta]
        values: dict[str, Any] = {}
        if state is not None:
            values = {"consumer": state.consumer, "last_event_at": state.last_event_at, "updated_at": state.updated_at}
        if rows:
            values |= {name: [row[name] for row in rows] for name in (*CELL_DIMENSIONS, "count")}
            sql, order = _apply_statement_pg(self.aggregates, with_state=state is not None)
            await self.connection.execute(sql, *(values[name] for name in order))
        elif state is not None:
            sql = _STATE_SQL.format_map({name: f"${i}" for i, name in enumerate(_STATE_PARAMS, 1)})
            await self.connection.execute(sql, *(values[name] for name in _STATE_PARAMS))


class RebuildRepository:
    """A rebuild's DDL and bookkeeping: shadow aggregates filled beside the live ones, then swapped in."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def _dialect(self) -> str:
        return self.session.get_bind().dialect.name

    async def prepare(self, shadow: Aggregates, consumer: str) -> None:
        """Empty shadow tables and no bookkeeping under ``consumer``: a rebuild starts from offset 0."""
        connection = await self.session.connection()

        def recreate(sync: Connection) -> None:
            for table in shadow.tables:
                table.drop(sync, checkfirst=True)
                table.create(sync)

        await connection.run_sync(recreate)
        for table in (processed_events, consumer_offsets, consumer_state):
            await self.session.execute(delete(table).where(table.c.consumer == consumer))

    async def lock_writers(self) -> None:
        """Hold off the live consumers until this transaction ends.

        Their batch transaction writes ``processed_events`` first, so they wait here before touching the
        aggregates, and then find the swapped-in tables. (SQLite has one writer at a time anyway.)
        """
        if self._dialect() == "postgresql":
            await self.session.execute(text("LOCK TABLE processed_events IN EXCLUSIVE MODE"))

    async def swap(self, shadow: Aggregates, *, live: str, rebuilt: str, topic: str, now: datetime) -> None:
        """Replace the live aggregates with the shadow's, and the live consumer's bookkeeping with the rebuild's."""
        statements: list[str] = []
        for live_table, shadow_table in zip(LIVE.tables, shadow.tables, strict=True):
            live_name, shadow_name = live_table.name, shadow_table.name
            statements += [f"DROP TABLE {live_name}", f"ALTER TABLE {shadow_name} RENAME TO {live_name}"]
            if self._dialect() == "postgresql":
                statements.append(f"ALTER INDEX {shadow_name}_pkey RENAME TO {live_name}_pkey")
            for index in shadow_table.indexes:
                columns = ", ".join(column.name for column in index.columns)
                if self._dialect() == "postgresql":
                    live_index = str(index.name).replace(shadow_name, live_name)
                    statements.append(f"ALTER INDEX {index.name} RENAME TO {live_index}")
                else:  # SQLite cannot rename an index
                    live_index = str(index.name).replace(shadow_name, live_name)
                    statements += [f"DROP INDEX {index.name}", f"CREATE INDEX {live_index} ON {live_name} ({columns})"]
        for statement in statements:
            await self.session.execute(text(statement))
        p, o, s = processed_events, consumer_offsets, consumer_state
        await self.session.execute(delete(p).where(p.c.consumer == live))
        await self.session.execute(update(p).where(p.c.consumer == rebuilt).values(consumer=live))
        await self.session.execute(delete(o).where(o.c.consumer == live, o.c.topic == topic))
        await self.session.execute(update(o).where(o.c.consumer == rebuilt).values(consumer=live))
        last_event_at = await self.session.scalar(select(s.c.last_event_at).where(s.c.consumer == rebuilt))
        await self.session.execute(delete(s).where(s.c.consumer.in_((live, rebuilt))))
        # as_of moves to now: the aggregates changed (if only in their history); cached answers are stale.
        await self.session.execute(insert(s).values(consumer=live, last_event_at=last_event_at, updated_at=now))
        await self.session.execute(update(aggregates_version).values(version=aggregates_version.c.version + 1))


class RollupRepository:
    """Rollups refilled from the cells: after a bulk load straight into ``dose_counts`` (benchmarks, tests)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def refill(self, aggregates: Aggregates = LIVE) -> None:
        for table in aggregates.rollups:
            key = [aggregates.counts.c[column.name] for column in table.primary_key.columns]
            await self.session.execute(delete(table))
            await self.session.execute(
                insert(table).from_select(
                    [*(column.name for column in key), "count"],
                    select(*key, func.sum(aggregates.counts.c["count"])).group_by(*key),
                )
            )
        await self.session.execute(update(aggregates_version).values(version=aggregates_version.c.version + 1))
