"""stats rules: applying dose events to the aggregates, answering cuts of them, and the open-data files.

Nothing here commits: the consumer owns its batch transaction, and a request's unit of work owns the rest.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from services.stats.models import LIVE, Aggregates, consumer_bookkeeping
from services.stats.population import Denominator, Population
from services.stats.repository import (
    DIMENSIONS,
    FINE_DIMENSIONS,
    ConsumerRepository,
    ConsumerState,
    Dimension,
    DoseFilter,
    DriverConsumerRepository,
    StatsRepository,
    read_version,
)
from services.stats.schemas import CoverageOut, CoverageRow, RowValue
from shared.auth import Principal, Role
from shared.bus import Message
from shared.consumer import Bookkeeping, DriverBookkeeping
from shared.db import Database
from shared.domain.codes import is_valid_prefecture_code, municipality_code_problem
from shared.errors import InvalidField, ServiceUnavailable
from shared.events import DoseEvent, StatsCell, dose_events_from_bytes

log = logging.getLogger(__name__)

# Cuts that show single municipalities are for national users (and services acting for them) only.
MUNICIPALITY_ROLES = frozenset({Role.NATIONAL})

NDJSON_MEDIA_TYPE = "application/x-ndjson"
CSV_MEDIA_TYPE = "text/csv; charset=utf-8"
SUMMARY_BY_DATE_HEADER = "date,count_first_or_mid_general,count_second_or_full_general\n"

# Rows per chunk of a streamed cut.
CUT_CHUNK_ROWS = 2000

# Rows per chunk of a streamed open-data file: large enough to keep per-chunk overhead negligible, small
# enough that the whole table is never held in memory at once.
EXPORT_CHUNK_ROWS = 5000

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# --- applying events ---------------------------------------------------------------------------------


@dataclass
class BatchOutcome:
    """What one batch did, for metrics once its transaction has committed."""

    applied: list[DoseEvent] = field(default_factory=list)
    duplicates: int = 0
    undecodable: int = 0


def fold_deltas(events: Iterable[DoseEvent]) -> dict[StatsCell, int]:
    """The net change per cell of applying ``events`` (−1 for ``previous_cell``, +1 for ``cell``).

    Cells whose changes cancel out are left out, so a correction that touches no statistics dimension
    (a lot number, say) costs no write.
    """
    deltas: dict[StatsCell, int] = {}
    for event in events:
        if event.previous_cell is not None:
            deltas[event.previous_cell] = deltas.get(event.previous_cell, 0) - 1
        if event.cell is not None:
            deltas[event.cell] = deltas.get(event.cell, 0) + 1
    return {cell: delta for cell, delta in deltas.items() if delta != 0}


def decode_messages(
    messages: Sequence[Message],
    *,
    positions: dict[uuid.UUID, tuple[int, int]] | None = None,
    sizes: list[int] | None = None,
) -> tuple[list[DoseEvent], int]:
    """The batch's events, each event id once, and how many messages could not be decoded.

    A message holds one event or several (a batch's, see :func:`shared.events.dose_events_from_bytes`). One
    that is not valid events of a known schema version is skipped whole: waiting for it would stop the
    statistics for good. The payload is never logged (only where it sits and what was wrong).
    ``positions``, when given, receives each event's (partition, offset) of its first message; ``sizes`` the
    number of events of each message decoded.
    """
    events: list[DoseEvent] = []
    seen: set[uuid.UUID] = set()
    undecodable = 0
    for message in messages:
        try:
            decoded = dose_events_from_bytes(message.value)
        except ValidationError as exc:  # also what invalid JSON or invalid UTF-8 raise
            undecodable += 1
            problems = [
                f"{'.'.join(map(str, e['loc'])) or '(message)'}:{e['type']}" for e in exc.errors(include_input=False)
            ]
            log.warning(
                "skipping undecodable message at partition %s offset %s: %s",
                message.partition,
                message.offset,
                ", ".join(problems[:5]),
            )
            continue
        if sizes is not None:
            sizes.append(len(decoded))
        for event in decoded:
            if event.event_id not in seen:
                seen.add(event.event_id)
                events.append(event)
                if positions is not None:
                    positions[event.event_id] = (message.partition, message.offset)
    return events, undecodable


def to_utc(moment: datetime) -> datetime:
    # A producer that sent a naive time meant UTC; SQLite keeps no offset, so store UTC throughout.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


async def apply_messages(
    database: AsyncSession | Any,
    *,
    consumer: str,
    topic: str,
    messages: Sequence[Message],
    now: datetime,
    aggregates: Aggregates = LIVE,
) -> BatchOutcome:
    """Apply one polled batch inside the caller's transaction: processed ids, counts, state (the loop stores
    the offsets in the same transaction). ``database`` is the batch's session, or on PostgreSQL the asyncpg
    connection of the batch's transaction (see :data:`shared.consumer.DriverHandler`).

    Events already processed by ``consumer`` (a relay that published twice, a replay after a crash) are
    recognised by their id and change nothing.
    """
    if isinstance(database, AsyncSession):
        bookkeeping: Bookkeeping | DriverBookkeeping = Bookkeeping(database, consumer_bookkeeping)
        counts: ConsumerRepository | DriverConsumerRepository = ConsumerRepository(database, aggregates=aggregates)
    else:
        bookkeeping = DriverBookkeeping(database, consumer_bookkeeping)
        counts = DriverConsumerRepository(database, aggregates=aggregates)
    positions: dict[uuid.UUID, tuple[int, int]] = {}
    sizes: list[int] = []
    events, undecodable = decode_messages(messages, positions=positions, sizes=sizes)
    fresh_ids = await bookkeeping.claim(consumer, positions, at=now)
    applied = [e for e in events if e.event_id in fresh_ids]
    state = None
    if applied:
        state = ConsumerState(consumer, last_event_at=max(to_utc(e.occurred_at) for e in applied), updated_at=now)
    await counts.add_to_counts(fold_deltas(applied), state=state)
    return BatchOutcome(
        applied=applied,
        # Counted per event decoded: a batch that carries one event twice has one duplicate too.
        duplicates=sum(sizes) - len(applied),
        undecodable=undecodable,
    )


async def stored_offsets(session: AsyncSession, *, consumer: str, topic: str) -> dict[int, int]:
    return await Bookkeeping(session, consumer_bookkeeping).offsets(consumer, topic)


# --- cuts of the aggregates (GET /api/v1/stats/doses) ---------------------------------------------------


def parse_group_by(raw: str | None) -> list[Dimension]:
    """``date,prefecture`` → the dimensions in the order given; empty → no grouping (one total row)."""
    if raw is None or not raw.strip():
        return []
    names: list[Dimension] = []
    for part in raw.split(","):
        name = part.strip()
        if name not in DIMENSIONS:
            allowed = ", ".join(DIMENSIONS)
            shown = name[:40] or "(empty)"
            raise InvalidField("group_by", f"unknown dimension '{shown}'; use a comma-separated subset of: {allowed}")
        dimension = DIMENSIONS[DIMENSIONS.index(name)]
        if dimension in names:
            raise InvalidField("group_by", f"dimension '{dimension}' is given twice")
        names.append(dimension)
    return names


def parse_date(field_name: str, raw: str | None) -> date | None:
    if raw is None or raw == "":
        return None
    if not _ISO_DATE.match(raw):
        raise InvalidField(field_name, "must be a date written YYYY-MM-DD")
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise InvalidField(field_name, "is not a calendar date") from None


def parse_filter(
    *, date_from: str | None, date_to: str | None, prefecture: str | None, municipality: str | None
) -> DoseFilter:
    start = parse_date("from", date_from)
    end = parse_date("to", date_to)
    if start is not None and end is not None and start > end:
        raise InvalidField("to", "must not be before 'from'")
    if prefecture == "":
        prefecture = None
    if prefecture is not None and not is_valid_prefecture_code(prefecture):
        raise InvalidField("prefecture", "must be a 2-digit prefecture code 01-47")
    if municipality == "":
        municipality = None
    if municipality is not None and (problem := municipality_code_problem(municipality)):
        raise InvalidField("municipality", problem)
    return DoseFilter(date_from=start, date_to=end, prefecture=prefecture, municipality=municipality)


def is_fine_cut(group_by: Sequence[Dimension], where: DoseFilter) -> bool:
    return bool(FINE_DIMENSIONS & set(group_by)) or where.municipality is not None


def suppression_for(principal: Principal, *, group_by: Sequence[Dimension], where: DoseFilter, threshold: int) -> int:
    """Counts below what are hidden in this caller's answer: 0 (exact) for national users and services, and for
    every caller on cuts no finer than the open data; ``threshold`` for everyone else on a fine cut."""
    if principal.role in MUNICIPALITY_ROLES or not is_fine_cut(group_by, where):
        return 0
    return threshold


def _json_value(value: date | str | int | bool) -> RowValue:
    return value.isoformat() if isinstance(value, date) else value


def as_utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else to_utc(moment)


class AnswerCache:
    """Answers already computed, by (the aggregates' version, as_of, the question): a bounded LRU per process.

    The version grows in every transaction that changes the aggregates (``aggregates_version``) and is read
    before the rows, so a cached answer is never older than the version a request reads — the same promise
    an uncached answer makes with ``as_of``. Dashboards ask the same few questions every few seconds;
    between two batches of the consumer they cost one small query each. Large answers (a long page of a
    fine cut) are not kept.
    """

    def __init__(self, *, entries: int = 512, entry_bytes: int = 256 * 1024) -> None:
        self.entries = entries
        self.entry_bytes = entry_bytes
        self._answers: OrderedDict[Hashable, bytes] = OrderedDict()

    def get(self, key: Hashable) -> bytes | None:
        answer = self._answers.get(key)
        if answer is not None:
            self._answers.move_to_end(key)
        return answer

    def put(self, key: Hashable, answer: bytes) -> None:
        if self.entries <= 0 or len(answer) > self.entry_bytes:
            return
        self._answers[key] = answer
        self._answers.move_to_end(key)
        while len(self._answers) > self.entries:
            self._answers.popitem(last=False)


def _as_of_json(as_of: datetime | None) -> bytes:
    return json.dumps(as_of.isoformat().replace("+00:00", "Z") if as_of else None).encode()


async def dose_cut(
    database: Database,
    *,
    group_by: Sequence[Dimension],
    where: DoseFilter,
    suppress_below: int,
    limit: int,
    offset: int,
    cache: AnswerCache | None = None,
) -> AsyncGenerator[bytes, None]:
    """The JSON answer of ``GET /api/v1/stats/doses``, streamed: ``{"as_of", "rows": [...]}``, then
    ``"next_offset"`` when more rows follow this page and ``"suppressed"`` (rows whose count is hidden as
    null) when the cut was suppressed. Rows come from the database in chunks, never all at once; an answer
    small enough is kept in ``cache`` until the aggregates change."""
    # Read the version and as_of before the rows: the rows are then at least as new as they claim.
    version, moment = await read_version(database.engine)
    as_of = as_utc(moment)
    key = ("doses", version, as_of, tuple(group_by), where, suppress_below, limit, offset)
    if cache is not None and (answer := cache.get(key)) is not None:
        yield answer
        return
    async with database.sessionmaker() as session:
        repo = StatsRepository(session)
        kept: list[bytes] | None = [] if cache is not None else None
        room = cache.entry_bytes if cache is not None else 0
        async for chunk in _cut_chunks(
            repo, as_of, group_by=group_by, where=where, suppress_below=suppress_below, limit=limit, offset=offset
        ):
            if kept is not None:
                room -= len(chunk)
                kept = kept if room >= 0 else None  # too large to keep: stop collecting
                if kept is not None:
                    kept.append(chunk)
            yield chunk
        if cache is not None and kept is not None:
            cache.put(key, b"".join(kept))


async def _cut_chunks(
    repo: StatsRepository,
    as_of: datetime | None,
    *,
    group_by: Sequence[Dimension],
    where: DoseFilter,
    suppress_below: int,
    limit: int,
    offset: int,
) -> AsyncGenerator[bytes, None]:
    yield b'{"as_of":' + _as_of_json(as_of)
    if not group_by and not suppress_below:
        yield b',"rows":[{"count":' + str(await repo.total(where)).encode() + b"}]}"
        return
    stmt = repo.cut_statement(group_by, where, suppress_below=suppress_below, limit=limit + 1, offset=offset)
    shown = hidden = 0
    more = False
    yield b',"rows":['
    async for rows in repo.stream_rows(stmt, chunk_rows=CUT_CHUNK_ROWS):
        parts: list[str] = []
        for values in rows:
            if shown == limit:
                more = True
                break
            row: dict[str, RowValue | None] = {
                name: _json_value(value) for name, value in zip(group_by, values[: len(group_by)], strict=True)
            }
            count = values[-1]
            row["count"] = None if count is None else int(count)
            hidden += count is None
            parts.append(("," if shown else "") + json.dumps(row, ensure_ascii=False, separators=(",", ":")))
            shown += 1
        if parts:
            yield "".join(parts).encode()
    if not group_by and shown == 0:
        yield b'{"count":0}'  # no doses in the municipality asked for
    tail = "]"
    if more:
        tail += f',"next_offset":{offset + limit}'
    if suppress_below:
        tail += f',"suppressed":{hidden}'
    yield (tail + "}").encode()


# --- coverage (GET /api/v1/stats/coverage) ------------------------------------------------------------

# The dose numbers every answer carries, given or not: the dashboard's 1回以上 and 2回完了.
HEADLINE_DOSES = (1, 2)


def parse_coverage_query(*, prefecture: str | None, group_by: str | None) -> tuple[str | None, bool]:
    """(the prefecture asked for or None, whether to answer per prefecture)."""
    if prefecture == "":
        prefecture = None
    if prefecture is not None and not is_valid_prefecture_code(prefecture):
        raise InvalidField("prefecture", "must be a 2-digit prefecture code 01-47")
    group = (group_by or "").strip()
    if group not in ("", "prefecture"):
        raise InvalidField("group_by", "coverage can only be grouped by 'prefecture' (or not at all)")
    return prefecture, group == "prefecture" or prefecture is not None


def _coverage_row(prefecture: str | None, denominator: Denominator, dose: int, people: int, senior: int) -> CoverageRow:
    return CoverageRow(
        prefecture=prefecture,
        population=denominator.population,
        population_65_and_over=denominator.population_65_and_over,
        dose_number=dose,
        count=people,
        count_65_and_over=senior,
        rate=people / denominator.population,
        rate_65_and_over=senior / denominator.population_65_and_over,
    )


async def coverage(
    database: Database,
    *,
    population: Population | str,
    prefecture: str | None,
    by_prefecture: bool,
    cache: AnswerCache | None = None,
) -> bytes:
    """接種率 as the real dashboard showed it, people with at least dose N over the population: the JSON of
    :class:`CoverageOut`, kept in ``cache`` until the aggregates change.

    ``population`` is the loaded table, or the reason it could not be loaded (answered as 503).

    "At least dose N" is "has a dose N": nobody gets dose 2 without dose 1 in the records, and counting
    holders of dose N is how the real dashboard counted 1回以上 and 2回完了.
    """
    if isinstance(population, str):  # why the table could not be loaded
        # The reason (a path on the server) is in the log since start; the caller learns which setting.
        raise ServiceUnavailable(
            "coverage rates are unavailable: the population table (VRS_STATS_POPULATION_PATH) is missing or invalid"
        )
    version, moment = await read_version(database.engine)
    as_of = as_utc(moment)
    question = ("coverage", version, as_of, prefecture, by_prefecture)
    if cache is not None and (cached := cache.get(question)) is not None:
        return cached
    async with database.sessionmaker() as session:
        people = await StatsRepository(session).people_by_dose(prefecture=prefecture, by_prefecture=by_prefecture)
    counted: dict[tuple[str | None, int], tuple[int, int]] = {}
    for values in people:
        key = (values[0], int(values[1])) if by_prefecture else (None, int(values[0]))
        counted[key] = (int(values[-2]), int(values[-1]))
    doses = sorted(set(HEADLINE_DOSES) | {dose for (_, dose), (people, _) in counted.items() if people > 0})
    if prefecture is not None:
        places: list[tuple[str | None, Denominator]] = [(prefecture, population.by_prefecture[prefecture])]
    elif by_prefecture:
        places = list(population.by_prefecture.items())
    else:
        places = [(None, population.national)]
    rows = [
        _coverage_row(place, denominator, dose, *counted.get((place, dose), (0, 0)))
        for place, denominator in places
        for dose in doses
    ]
    answer = CoverageOut(as_of=as_of, rows=rows).model_dump_json().encode()
    if cache is not None:
        cache.put(question, answer)
    return answer


# --- open data (the Digital Agency's formats, byte for byte) -------------------------------------------


def ndjson_line(
    *,
    day: date,
    prefecture: str,
    sex: str,
    age_band: str,
    medical_worker: bool,
    dose_number: int,
    count: int,
) -> str:
    """One line of ``prefecture.ndjson``: compact JSON, the published key order, newline-terminated.

    Written by hand rather than by ``json.dumps`` of a dict: the key order and spacing are the format, and
    this is the hot loop of the export. Strings still go through ``json.dumps`` so that any value is valid.
    """
    return (
        f'{{"date":"{day.isoformat()}","prefecture":{json.dumps(prefecture)},"gender":{json.dumps(sex)},'
        f'"age":{json.dumps(age_band)},"medical_worker":{"true" if medical_worker else "false"},'
        f'"status":{int(dose_number)},"count":{int(count)}}}\n'
    )


def summary_by_date_line(*, day: date, first: int, second: int) -> str:
    return f"{day.isoformat()},{int(first)},{int(second)}\n"


async def prefecture_ndjson(database: Database) -> AsyncGenerator[bytes, None]:
    """``prefecture.ndjson``: per date × prefecture × gender × age × medical_worker × status, the doses.

    Municipalities and vaccines are summed away; only cells above zero appear; lines are sorted by date,
    prefecture, gender (F, M, U), age (-64, 65-, UNK), medical_worker, status; every line ends in ``\\n``,
    the last one too, as in the published file.
    """
    async with database.sessionmaker() as session:
        async for rows in StatsRepository(session).prefecture_cells(chunk_rows=EXPORT_CHUNK_ROWS):
            yield "".join(
                ndjson_line(
                    day=r.date,
                    prefecture=r.prefecture,
                    sex=r.sex,
                    age_band=r.age_band,
                    medical_worker=r.medical_worker,
                    dose_number=r.dose_number,
                    count=r.doses,
                )
                for r in rows
            ).encode()


async def summary_by_date_csv(database: Database) -> AsyncGenerator[bytes, None]:
    """``summary_by_date.csv``: per vaccination date, first and second doses of 一般接種 (general vaccination).

    The basis we chose (the published numbers were computed on another one; only the format is fixed):
    doses by the date they were given (接種日), all vaccines and all prefectures, excluding doses recorded as
    given to medical workers (医療従事者等), whose programme the ``general`` in the column names sets apart.
    ``count_first_or_mid_general`` counts dose 1 and ``count_second_or_full_general`` dose 2 (the two-dose
    primary series); doses 3+ are in neither. A date appears when either count is above zero. Header
    first, ``\\n`` line endings, a final newline, no quoting — as in the published file.
    """
    yield SUMMARY_BY_DATE_HEADER.encode()
    async with database.sessionmaker() as session:
        async for rows in StatsRepository(session).general_doses_by_date(chunk_rows=EXPORT_CHUNK_ROWS):
            yield "".join(summary_by_date_line(day=r.date, first=r.first, second=r.second) for r in rows).encode()
