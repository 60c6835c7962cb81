"""Pure parts of stats: folding events into deltas, decoding, parameters, permissions, file lines."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import uuid
from datetime import date
from typing import Any

import pytest

from services.stats import service
from services.stats.dashboard import DASHBOARD, load_page
from services.stats.models import dose_counts
from services.stats.repository import DIMENSIONS, DoseFilter, table_for
from services.stats.settings import StatsSettings
from shared.auth import ANONYMOUS, Principal, Role
from shared.bus import Message
from shared.consumer import next_offsets
from shared.domain.age import AgeBand, AgeBand10
from shared.errors import InvalidField
from shared.events import DoseEvent, DoseEventType, StatsCell
from tests.factories import cell


def event(kind: DoseEventType, new: StatsCell | None, previous: StatsCell | None = None) -> DoseEvent:
    return DoseEvent(type=kind, dose_id=uuid.uuid4(), municipality="131016", cell=new, previous_cell=previous)


A = cell()
B = cell(date=date(2021, 6, 2))
UNKNOWN = cell(sex="U", age_band=AgeBand.UNKNOWN)
THIRTIES = cell(age_band_10=AgeBand10.AGE_30_39)  # A as counted once records sends the 10-year band
FORTIES = cell(age_band_10=AgeBand10.AGE_40_49)


# --- fold_deltas --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([], {}),
        ([event(DoseEventType.RECORDED, A)], {A: 1}),
        ([event(DoseEventType.RECORDED, A), event(DoseEventType.RECORDED, A)], {A: 2}),
        ([event(DoseEventType.CORRECTED, B, A)], {A: -1, B: 1}),
        ([event(DoseEventType.VOIDED, None, A)], {A: -1}),
        ([event(DoseEventType.MATCHED, A, UNKNOWN)], {UNKNOWN: -1, A: 1}),
        ([event(DoseEventType.CORRECTED, A, A)], {}),  # a lot-number fix: no statistics change
        ([event(DoseEventType.RECORDED, A), event(DoseEventType.VOIDED, None, A)], {}),
        (
            [
                event(DoseEventType.RECORDED, UNKNOWN),
                event(DoseEventType.MATCHED, A, UNKNOWN),
                event(DoseEventType.CORRECTED, B, A),
            ],
            {B: 1},
        ),
        ([event(DoseEventType.VOIDED, None, None)], {}),
        # The 10-year band is a dimension like the others: a dose recorded before records sent it (A, UNK)
        # moves to its band on its next event, and a date correction across a birthday moves it again.
        ([event(DoseEventType.CORRECTED, THIRTIES, A)], {A: -1, THIRTIES: 1}),
        ([event(DoseEventType.CORRECTED, FORTIES, THIRTIES)], {THIRTIES: -1, FORTIES: 1}),
        ([event(DoseEventType.RECORDED, THIRTIES), event(DoseEventType.VOIDED, None, THIRTIES)], {}),
        ([event(DoseEventType.MATCHED, THIRTIES, UNKNOWN)], {UNKNOWN: -1, THIRTIES: 1}),
    ],
    ids=[
        "none",
        "recorded",
        "twice",
        "corrected",
        "voided",
        "matched",
        "no-op",
        "cancel",
        "chain",
        "empty",
        "band-10-first-seen",
        "band-10-moved",
        "band-10-cancel",
        "band-10-matched",
    ],
)
def test_fold_deltas(events: list[DoseEvent], expected: dict[StatsCell, int]) -> None:
    assert service.fold_deltas(events) == expected


def test_fold_deltas_keys_cells_by_every_dimension() -> None:
    cells = [cell(**{name: value}) for name, value in _one_change_per_dimension().items()]
    deltas = service.fold_deltas([event(DoseEventType.RECORDED, c) for c in [A, *cells]])
    assert len(deltas) == len(DIMENSIONS) + 1


def _one_change_per_dimension() -> dict[str, Any]:
    return {
        "date": date(2021, 6, 9),
        "prefecture": "01",
        "municipality": "011002",
        "sex": "M",
        "age_band": AgeBand.SIXTY_FIVE_PLUS,
        "age_band_10": AgeBand10.AGE_70_79,
        "medical_worker": True,
        "dose_number": 2,
        "vaccine": "moderna",
    }


def test_dimensions_are_exactly_the_cell_fields() -> None:
    assert set(DIMENSIONS) == set(StatsCell.model_fields)
    assert set(_one_change_per_dimension()) == set(DIMENSIONS)


# --- decoding a batch -----------------------------------------------------------------------------------


def message(value: bytes, offset: int, partition: int = 0) -> Message:
    return Message(partition=partition, offset=offset, key="131016", value=value)


def test_an_event_from_before_the_10_year_band_decodes_with_it_unknown() -> None:
    current = event(DoseEventType.CORRECTED, THIRTIES, A)
    older = current.model_dump(mode="json")
    for key in ("cell", "previous_cell"):
        del older[key]["age_band_10"]
    [decoded], undecodable = service.decode_messages([message(json.dumps(older).encode(), 0)])
    assert undecodable == 0
    assert decoded.cell is not None and decoded.cell.age_band_10 is AgeBand10.UNKNOWN
    assert decoded.cell == A  # so it counts where it was counted before the field existed


def test_decode_skips_garbage_and_repeats_without_logging_payloads(caplog: pytest.LogCaptureFixture) -> None:
    good = event(DoseEventType.RECORDED, A)
    other = event(DoseEventType.RECORDED, B)
    future = json.dumps(good.model_dump(mode="json") | {"schema_version": 2}).encode()
    secret = b'{"type": "123456789018"}'
    batch = [
        message(good.to_bytes(), 0),
        message(b"{not json", 1),
        message(good.to_bytes(), 2),
        message(future, 3),
        message(secret, 4),
        message(other.to_bytes(), 0, partition=1),
    ]
    with caplog.at_level(logging.WARNING):
        events, undecodable = service.decode_messages(batch)
    assert events == [good, other]
    assert undecodable == 3
    assert "partition 0 offset 1" in caplog.text
    assert "123456789018" not in caplog.text and "not json" not in caplog.text
    assert next_offsets(batch) == {0: 5, 1: 1}


def test_a_message_of_several_events_gives_each_its_position_and_is_skipped_whole_if_unreadable() -> None:
    first, second, third = (event(DoseEventType.RECORDED, A) for _ in range(3))
    array = b"[" + first.to_bytes() + b"," + second.to_bytes() + b"]"
    broken = b"[" + third.to_bytes() + b',{"type": "dose.recorded"}]'
    positions: dict[uuid.UUID, tuple[int, int]] = {}
    sizes: list[int] = []
    batch = [message(array, 7), message(broken, 8), message(first.to_bytes(), 9)]
    events, undecodable = service.decode_messages(batch, positions=positions, sizes=sizes)
    assert events == [first, second] and undecodable == 1  # no part of a broken message is applied
    assert positions == {first.event_id: (0, 7), second.event_id: (0, 7)}  # where each was first read
    assert sizes == [2, 1]  # events per message decoded, the repeat of ``first`` included


# --- parameters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, []),
        ("", []),
        ("  ", []),
        ("date", ["date"]),
        ("prefecture,date", ["prefecture", "date"]),
        (" sex , age_band ", ["sex", "age_band"]),
        (",".join(reversed(DIMENSIONS)), list(reversed(DIMENSIONS))),
    ],
)
def test_parse_group_by_keeps_the_order(raw: str | None, expected: list[str]) -> None:
    assert service.parse_group_by(raw) == expected


@pytest.mark.parametrize(
    "raw", ["town", "date,", "date,,sex", "date,date", "Date", "count", "date;sex", "municipality)"]
)
def test_parse_group_by_refuses_unknown_names(raw: str) -> None:
    with pytest.raises(InvalidField) as caught:
        service.parse_group_by(raw)
    assert caught.value.field == "group_by"


def test_parse_filter() -> None:
    where = service.parse_filter(date_from="2021-06-01", date_to="2021-06-30", prefecture="13", municipality="131016")
    assert where == DoseFilter(date(2021, 6, 1), date(2021, 6, 30), "13", "131016")
    assert service.parse_filter(date_from="", date_to=None, prefecture="", municipality="") == DoseFilter()
    assert len(where.clauses(dose_counts)) == 4 and DoseFilter().clauses(dose_counts) == []
    assert where.dimensions() == {"date", "prefecture", "municipality"} and DoseFilter().dimensions() == set()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"date_from": "2021-6-1"}, "from"),
        ({"date_from": "2021-02-30"}, "from"),
        ({"date_to": "20210601"}, "to"),
        ({"date_to": "２０２１-06-01"}, "to"),
        ({"date_from": "2021-06-02", "date_to": "2021-06-01"}, "to"),
        ({"prefecture": "00"}, "prefecture"),
        ({"prefecture": "48"}, "prefecture"),
        ({"prefecture": "ab"}, "prefecture"),
        ({"municipality": "131017"}, "municipality"),
        ({"municipality": "13101"}, "municipality"),
    ],
)
def test_parse_filter_refuses_bad_values(params: dict[str, str], field: str) -> None:
    arguments: dict[str, str | None] = {"date_from": None, "date_to": None, "prefecture": None, "municipality": None}
    arguments.update(params)
    with pytest.raises(InvalidField) as caught:
        service.parse_filter(**arguments)
    assert caught.value.field == field


# --- who may cut by municipality --------------------------------------------------------------------------

NATIONAL = Principal(role=Role.NATIONAL, subject="mhlw")
MUNICIPALITY = Principal(role=Role.MUNICIPALITY, subject="131016", municipality="131016")
INSTITUTION = Principal(role=Role.INSTITUTION, subject="1312345678", institution="1312345678")


@pytest.mark.parametrize("principal", [ANONYMOUS, NATIONAL, MUNICIPALITY, INSTITUTION])
def test_cuts_no_finer_than_the_open_data_are_exact_for_everyone(principal: Principal) -> None:
    group_by: list[Any] = ["date", "prefecture", "sex", "age_band", "medical_worker", "dose_number"]
    assert service.suppression_for(principal, group_by=group_by, where=DoseFilter(prefecture="13"), threshold=10) == 0


@pytest.mark.parametrize(
    ("principal", "hidden_below"),
    [(ANONYMOUS, 10), (MUNICIPALITY, 10), (INSTITUTION, 10), (NATIONAL, 0)],
)
@pytest.mark.parametrize(
    ("group_by", "where"),
    [
        (["municipality"], DoseFilter()),
        (["date"], DoseFilter(municipality="131016")),
        (["prefecture", "vaccine"], DoseFilter()),
    ],
    ids=["by-municipality", "one-municipality", "by-vaccine"],
)
def test_fine_cuts_are_suppressed_except_for_national_users(
    principal: Principal, hidden_below: int, group_by: list[Any], where: DoseFilter
) -> None:
    assert service.suppression_for(principal, group_by=group_by, where=where, threshold=10) == hidden_below


# --- open-data lines --------------------------------------------------------------------------------------


def test_ndjson_line_is_the_published_format() -> None:
    line = service.ndjson_line(
        day=date(2021, 4, 12),
        prefecture="01",
        sex="F",
        age_band="-64",
        medical_worker=False,
        dose_number=1,
        count=113,
    )
    # The first line of the Digital Agency's prefecture.ndjson of 2021-07-15.
    assert line == (
        '{"date":"2021-04-12","prefecture":"01","gender":"F","age":"-64","medical_worker":false,"status":1,"count":113}\n'
    )
    assert list(json.loads(line)) == ["date", "prefecture", "gender", "age", "medical_worker", "status", "count"]


def test_ndjson_line_stays_valid_json_for_any_string() -> None:
    line = service.ndjson_line(
        day=date(2021, 4, 12), prefecture='1"', sex="\\", age_band="65-", medical_worker=True, dose_number=3, count=0
    )
    assert json.loads(line) == {
        "date": "2021-04-12",
        "prefecture": '1"',
        "gender": "\\",
        "age": "65-",
        "medical_worker": True,
        "status": 3,
        "count": 0,
    }


def test_summary_by_date_line() -> None:
    assert service.summary_by_date_line(day=date(2021, 6, 7), first=335361, second=95295) == "2021-06-07,335361,95295\n"
    assert service.SUMMARY_BY_DATE_HEADER == "date,count_first_or_mid_general,count_second_or_full_general\n"


# --- dashboard and settings --------------------------------------------------------------------------------


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_dashboard_csp_allows_exactly_its_inline_script_and_style() -> None:
    page = load_page("<html><style>b{}</style><script>go()</script></html>")
    csp = page.headers["Content-Security-Policy"]
    assert f"script-src 'self' {_sha256('go()')}" in csp
    assert f"style-src {_sha256('b{}')}" in csp
    assert "default-src 'none'" in DASHBOARD.headers["Content-Security-Policy"]
    with pytest.raises(ValueError, match="script"):
        load_page("<html><style></style></html>")


def test_settings_read_their_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("VRS_STATS_MAIN_DSN", f"sqlite+aiosqlite:///{tmp_path}/s.db")
    monkeypatch.setenv("VRS_STATS_RUN_CONSUMER", "false")
    monkeypatch.setenv("VRS_STATS_POLL_MAX_RECORDS", "50")
    monkeypatch.setenv("VRS_BUS_TOPIC", "other-events")
    settings = StatsSettings()
    assert settings.main_dsn.endswith("/s.db")
    assert settings.run_consumer is False
    assert settings.poll_max_records == 50
    assert settings.consumer_name == "stats"
    assert settings.small_cell_threshold == 10
    assert settings.bus.topic == "other-events"


# --- which table answers a cut; cached answers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("needed", "table"),
    [
        ({"date", "dose_number"}, "dose_totals_by_date"),
        ({"dose_number"}, "dose_totals_by_date"),
        (set(), "dose_totals_by_date"),
        ({"prefecture", "dose_number", "age_band"}, "dose_totals_by_prefecture"),
        ({"age_band_10", "sex", "dose_number"}, "dose_totals_by_prefecture"),
        ({"prefecture", "date", "dose_number"}, "dose_totals_by_prefecture_date"),
        ({"date", "sex", "age_band", "dose_number"}, "dose_totals_by_cell"),
        ({"date", "prefecture", "sex", "age_band", "medical_worker", "dose_number"}, "dose_totals_by_cell"),
        ({"municipality"}, "dose_counts"),
        ({"date", "vaccine"}, "dose_counts"),
    ],
)
def test_a_cut_reads_the_smallest_table_with_its_dimensions(needed: set[str], table: str) -> None:
    assert table_for(needed).name == table


def test_the_answer_cache_is_bounded_and_keeps_no_large_answer() -> None:
    cache = service.AnswerCache(entries=2, entry_bytes=10)
    cache.put("a", b"1")
    cache.put("b", b"2")
    assert cache.get("a") == b"1"  # now the most recent
    cache.put("c", b"3")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (b"1", None, b"3")
    cache.put("big", b"x" * 11)
    assert cache.get("big") is None
    off = service.AnswerCache(entries=0)
    off.put("a", b"1")
    assert off.get("a") is None
