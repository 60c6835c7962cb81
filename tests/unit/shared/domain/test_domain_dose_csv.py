"""The dose CSV of a mass vaccination site: columns, values on both sides, repeated client ids."""

from __future__ import annotations

import io
from datetime import date

import pytest

from shared.domain.csv_stream import CsvFileError, RowError
from shared.domain.dose_csv import DoseRow, parse_dose_csv

HEADER = "client_id,coupon,dose_number,vaccinated_on,vaccine,lot_number,venue,doctor,medical_worker"
LINE = "110110020000000001"
BASE = {
    "client_id": "site-1",
    "coupon": LINE,
    "dose_number": "1",
    "vaccinated_on": "2021-06-01",
    "vaccine": "pfizer",
    "lot_number": "EY0583",
    "venue": "集団接種会場",
    "doctor": "佐藤 医師",
    "medical_worker": "false",
}
EXPECTED = DoseRow("site-1", LINE, 1, date(2021, 6, 1), "pfizer", "EY0583", "集団接種会場", "佐藤 医師", False)

Result = DoseRow | list[RowError]


def parse(text: str, *, encoding: str = "utf-8", chunk_size: int = 1 << 16) -> list[tuple[int, Result]]:
    return list(parse_dose_csv(io.BytesIO(text.encode(encoding)), chunk_size=chunk_size))


def one(**values: str) -> Result:
    row = BASE | values
    ((row_number, result),) = parse(HEADER + "\n" + ",".join(row[c] for c in HEADER.split(",")) + "\n")
    assert row_number == 2
    return result


def errors_of(result: Result) -> dict[str, str]:
    assert isinstance(result, list), result
    return {e.field: e.message for e in result}


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp932"])
@pytest.mark.parametrize("chunk_size", [1, 3, 1 << 16])
def test_a_good_file(encoding: str, chunk_size: int) -> None:
    text = (
        HEADER
        + "\r\n"
        + ",".join(BASE.values())
        + "\r\n"
        + "site-2,110110020000000002,2,20210622,moderna,3004734,,,1\r\n"
    )
    assert parse(text, encoding=encoding, chunk_size=chunk_size) == [
        (2, EXPECTED),
        (3, DoseRow("site-2", "110110020000000002", 2, date(2021, 6, 22), "moderna", "3004734", None, None, True)),
    ]


def test_columns_in_any_order_optional_ones_absent_unknown_ignored() -> None:
    text = (
        f"lot_number,vaccine,note,vaccinated_on,dose_number,coupon,client_id\nEY0583,pfizer,x,2021/06/01,1,{LINE},c1\n"
    )
    assert parse(text) == [(2, DoseRow("c1", LINE, 1, date(2021, 6, 1), "pfizer", "EY0583"))]


@pytest.mark.parametrize("missing", ["client_id", "coupon", "dose_number", "vaccinated_on", "vaccine", "lot_number"])
def test_a_missing_required_column_is_a_file_error(missing: str) -> None:
    header = ",".join(c for c in HEADER.split(",") if c != missing)
    with pytest.raises(CsvFileError, match=f"required column {missing}"):
        parse(header + "\n")


@pytest.mark.parametrize(
    ("field", "value", "stored"),
    [
        ("coupon", "".join(chr(ord(c) + 0xFEE0) for c in LINE), LINE),  # 全角, as OCR software may write it
        ("coupon", " " + LINE + " ", LINE),
        ("coupon", "1234", "1234"),  # its validity is the dose rules' judgement, not the parser's
        ("dose_number", "1", 1),
        ("dose_number", "10", 10),
        ("dose_number", "０２", 2),
        ("dose_number", "0", 0),  # range: the dose rules
        ("dose_number", "999", 999),
        ("vaccinated_on", "20210601", date(2021, 6, 1)),
        ("vaccinated_on", "2021/6/1", date(2021, 6, 1)),
        ("vaccinated_on", "２０２１－０６－０１", date(2021, 6, 1)),
        ("vaccinated_on", "2099-01-01", date(2099, 1, 1)),  # the future: the dose rules, with Japan's today
        ("medical_worker", "true", True),
        ("medical_worker", "TRUE", True),
        ("medical_worker", "1", True),
        ("medical_worker", "false", False),
        ("medical_worker", "0", False),
        ("medical_worker", "", False),
        ("lot_number", "L" * 20, "L" * 20),
        ("venue", "会" * 30, "会" * 30),
        ("venue", "", None),
        ("doctor", "医" * 20, "医" * 20),
        ("client_id", "c" * 100, "c" * 100),
    ],
)
def test_values_accepted(field: str, value: str, stored: object) -> None:
    result = one(**{field: value})
    assert isinstance(result, DoseRow), result
    assert getattr(result, field) == stored


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("client_id", "", "is required"),
        ("client_id", "c" * 101, "longer than 100"),
        ("coupon", "", "is required"),
        ("dose_number", "", "is required"),
        ("dose_number", "one", "whole number"),
        ("dose_number", "-1", "whole number"),
        ("dose_number", "1.0", "whole number"),
        ("dose_number", "1000", "whole number"),
        ("vaccinated_on", "", "is required"),
        ("vaccinated_on", "2021-02-29", "not a calendar date"),
        ("vaccinated_on", "06/01/2021", "must be a date"),
        ("vaccine", "", "is required"),
        ("lot_number", "", "is required"),
        ("lot_number", "L" * 21, "longer than 20"),
        ("venue", "会" * 31, "longer than 30"),
        ("doctor", "医" * 21, "longer than 20"),
        ("medical_worker", "yes", "true, false, 1, 0"),
        ("medical_worker", "2", "true, false, 1, 0"),
    ],
)
def test_values_refused(field: str, value: str, reason: str) -> None:
    assert reason in errors_of(one(**{field: value}))[field]


def test_every_error_of_a_row_at_once() -> None:
    result = parse(f"{HEADER}\n,,x,y,,,,,maybe\n")[0][1]
    assert set(errors_of(result)) == {
        "client_id",
        "coupon",
        "dose_number",
        "vaccinated_on",
        "vaccine",
        "lot_number",
        "medical_worker",
    }


def test_a_client_id_twice_is_an_error_on_the_later_row() -> None:
    good = ",".join(BASE.values())
    rows = parse(f"{HEADER}\n{good}\n{good.replace(LINE, '110110020000000002')}\nsite-3{good[6:]}\n")
    assert rows[0] == (2, EXPECTED)
    assert rows[1] == (3, [RowError("client_id", "site-1 appears on an earlier row of this file")])
    assert isinstance(rows[2][1], DoseRow) and rows[2][1].client_id == "site-3"


def test_a_client_id_on_a_bad_row_still_counts() -> None:
    bad = ",".join((BASE | {"dose_number": "x"}).values())
    rows = parse(f"{HEADER}\n{bad}\n{','.join(BASE.values())}\n")
    assert list(errors_of(rows[0][1])) == ["dose_number"]
    assert list(errors_of(rows[1][1])) == ["client_id"]
