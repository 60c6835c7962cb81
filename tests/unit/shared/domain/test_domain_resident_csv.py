"""The resident CSV: encodings, headers, every value rule on both sides, repeats, row numbers, streaming."""

from __future__ import annotations

import io
import random
from dataclasses import replace
from datetime import date, timedelta
from itertools import islice

import pytest

from shared.domain.csv_stream import CsvFileError, RowError
from shared.domain.keyset import text_key
from shared.domain.resident_csv import Repeats, ResidentRow, RowKeys, parse_resident_csv
from shared.domain.sex import Sex

TODAY = date(2026, 11, 25)
MN1, MN2, MN3 = "123456789018", "100000000005", "200000000018"  # valid check digits
HEADER_EN = "resident_id,name,name_kana,birth_date,sex,my_number,address,coupon_number"
HEADER_JA = "個別宛名番号,氏名,氏名カナ,生年月日,性別,個人番号,住所,券番号"
ROW = f"R1,山田 太郎,ヤマダ タロウ,1950-04-01,1,{MN1},東京都千代田区,0000000001"
EXPECTED = ResidentRow(
    resident_id="R1",
    name="山田 太郎",
    name_kana="ヤマダ タロウ",
    birth_date=date(1950, 4, 1),
    sex=Sex.MALE,
    my_number=MN1,
    address="東京都千代田区",
    coupon_number="0000000001",
)

Result = ResidentRow | list[RowError]


def parse(
    text: str, *, encoding: str = "utf-8", bom: bool = False, chunk_size: int = 1 << 16
) -> list[tuple[int, Result]]:
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding)
    return list(parse_resident_csv(io.BytesIO(data), today=TODAY, chunk_size=chunk_size))


def only(text: str) -> Result:
    ((row_number, result),) = parse(text)
    assert row_number == 2
    return result


def errors_of(result: Result) -> dict[str, str]:
    assert isinstance(result, list), result
    return {e.field: e.message for e in result}


def row_with(**values: str) -> str:
    base = {
        "resident_id": "R1",
        "name": "山田 太郎",
        "name_kana": "ヤマダ タロウ",
        "birth_date": "1950-04-01",
        "sex": "1",
        "my_number": MN1,
        "address": "東京都千代田区",
        "coupon_number": "0000000001",
    } | values
    return HEADER_EN + "\n" + ",".join(base[c] for c in HEADER_EN.split(",")) + "\n"


# --- encodings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [HEADER_EN, HEADER_JA])
@pytest.mark.parametrize(
    ("encoding", "bom"), [("utf-8", False), ("utf-8", True), ("cp932", False), ("shift_jis", False)]
)
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 1 << 16])  # chunk ends inside characters, BOM, CRLF
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_encodings(header: str, encoding: str, bom: bool, chunk_size: int, newline: str) -> None:
    text = newline.join([header, ROW, ROW.replace("R1", "R2").replace(MN1, MN2).replace("0000000001", "")]) + newline
    rows = parse(text, encoding=encoding, bom=bom, chunk_size=chunk_size)
    assert rows == [
        (2, EXPECTED),
        (3, replace(EXPECTED, resident_id="R2", my_number=MN2, coupon_number=None)),
    ]


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_shift_jis_detected_after_a_long_ascii_prefix(chunk_size: int) -> None:
    # English header and ASCII rows first: the encoding is decided only where Japanese text begins.
    ascii_rows = [f"A{n},Taro,Taro,,U,,," for n in range(2000)]
    text = "\r\n".join([HEADER_EN, *ascii_rows, ROW]) + "\r\n"
    rows = parse(text, encoding="cp932", chunk_size=chunk_size)
    assert len(rows) == 2001
    assert rows[-1] == (2002, EXPECTED)


def test_utf8_with_a_lone_kanji_at_a_chunk_end() -> None:
    text = f"{HEADER_EN}\nR1,漢,カ,,,,,\n"
    for chunk_size in range(1, 12):
        assert parse(text, chunk_size=chunk_size)[0][1] == ResidentRow("R1", "漢", "カ", None, Sex.UNKNOWN)


def test_invalid_bytes_are_a_row_error_not_a_file_error() -> None:
    good = f"{HEADER_JA}\r\n{ROW}\r\n".encode("cp932")
    bad = "R2,".encode("cp932") + b"\x82\xff" + ",ヤマダ,,,,,\r\n".encode("cp932")
    rows = list(parse_resident_csv(io.BytesIO(good + bad), today=TODAY))
    assert rows[0] == (2, EXPECTED)
    assert rows[1] == (3, [RowError("name", "holds bytes that are not valid cp932")])


SHORT_EN, SHORT_JA = "resident_id,name,name_kana,birth_date,sex\n", "個別宛名番号,氏名,氏名カナ,生年月日,性別\n"
SUZUKI_ROW, SATO_ROW = "r1,鈴木,スズキ,19500401,1\n", "r3,佐藤,サトウ,19700101,2\n"
SUZUKI = ResidentRow("r1", "鈴木", "スズキ", date(1950, 4, 1), Sex.MALE)
SATO = ResidentRow("r3", "佐藤", "サトウ", date(1970, 1, 1), Sex.FEMALE)


def damaged_utf8(field: str) -> list[RowError]:
    return [RowError(field, "holds bytes that are not valid utf-8")]


@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 16])  # decided on one line, or on the whole file
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ((SHORT_JA + SUZUKI_ROW).encode(), [(2, SUZUKI)]),
        (b"\xef\xbb\xbf" + (SHORT_JA + SUZUKI_ROW).encode(), [(2, SUZUKI)]),
        ((SHORT_JA + SUZUKI_ROW + SATO_ROW).encode("cp932"), [(2, SUZUKI), (3, SATO)]),
        # UTF-8 with one bad byte: the good rows read as they are, the bad one is reported by row and field.
        (
            (SHORT_EN + SUZUKI_ROW).encode() + b"r2,\xff,x,19600101,2\n" + SATO_ROW.encode(),
            [(2, SUZUKI), (3, damaged_utf8("name")), (4, SATO)],
        ),
        (
            (SHORT_JA + SUZUKI_ROW).encode() + b"r2,\xff,x,19600101,2\n" + SATO_ROW.encode(),
            [(2, SUZUKI), (3, damaged_utf8("name")), (4, SATO)],
        ),
        # The bad byte in the first line holding Japanese, which decides the encoding.
        (
            SHORT_EN.encode() + "r2,鈴木,スズキ".encode() + b"\xff,19600101,2\n" + SATO_ROW.encode(),
            [(2, damaged_utf8("name_kana")), (3, SATO)],
        ),
        # cp932 with a byte cp932 has no character for (a lead byte without its trail byte).
        (
            (SHORT_JA + SUZUKI_ROW).encode("cp932") + b"r2,\x82\xff,x,19600101,2\n" + SATO_ROW.encode("cp932"),
            [(2, SUZUKI), (3, [RowError("name", "holds bytes that are not valid cp932")]), (4, SATO)],
        ),
        (
            b"resident_id,name,name_kana,birth_date,sex\nr1,Suzuki,Suzuki,19500401,1\n",
            [(2, ResidentRow("r1", "Suzuki", "Suzuki", date(1950, 4, 1), Sex.MALE))],
        ),
    ],
    ids=[
        "utf-8",
        "utf-8 with BOM",
        "cp932",
        "utf-8, one bad byte",
        "utf-8, Japanese header, one bad byte",
        "utf-8, bad byte in the deciding line",
        "cp932, one bad byte",
        "ascii",
    ],
)
def test_the_encoding_is_detected_and_bad_bytes_are_row_errors(
    data: bytes, expected: list[tuple[int, Result]], chunk_size: int
) -> None:
    assert list(parse_resident_csv(io.BytesIO(data), today=TODAY, chunk_size=chunk_size)) == expected


def test_utf16_is_refused_with_a_clear_error() -> None:
    with pytest.raises(CsvFileError, match="UTF-16"):
        list(parse_resident_csv(io.BytesIO(f"{HEADER_EN}\n".encode("utf-16")), today=TODAY))


# --- the header --------------------------------------------------------------------------------------------------


def test_columns_in_any_order_mixed_names_and_unknown_columns_ignored() -> None:
    text = (
        "備考,券番号,name_kana,個人番号,氏名,resident_id,性別,住所,生年月日,extra\n"
        f"メモ,0000000001,ヤマダ タロウ,{MN1},山田 太郎,R1,男,東京都千代田区,19500401,x\n"
    )
    assert only(text) == EXPECTED


def test_only_required_columns() -> None:
    assert only("氏名カナ,氏名,個別宛名番号\nヤマダ,山田,R9\n") == ResidentRow(
        "R9", "山田", "ヤマダ", None, Sex.UNKNOWN
    )


@pytest.mark.parametrize(
    ("header", "missing"),
    [
        ("name,name_kana", "resident_id"),
        ("個別宛名番号,氏名カナ", "name"),
        ("resident_id,name,kana", "name_kana"),
        ("residentid,name,name_kana", "resident_id"),
    ],
)
def test_missing_required_column_is_one_file_error(header: str, missing: str) -> None:
    with pytest.raises(CsvFileError, match=f"required column {missing}"):
        parse(f"{header}\nR1,a,b\nR2,c,d\n")


@pytest.mark.parametrize("header", ["resident_id,name,氏名,name_kana", "resident_id,name,name_kana,NAME"])
def test_a_column_named_twice_is_a_file_error(header: str) -> None:
    with pytest.raises(CsvFileError, match="appears twice"):
        parse(f"{header}\n")


@pytest.mark.parametrize("text", ["", "\n", " , ,\n"])
def test_no_header_is_a_file_error(text: str) -> None:
    with pytest.raises(CsvFileError, match="no header"):
        parse(text)


def test_header_names_tolerate_case_spaces_and_full_width() -> None:
    assert only(" Resident_ID ,ＮＡＭＥ,name_kana\nR1,a,b\n") == ResidentRow("R1", "a", "b", None, Sex.UNKNOWN)


def test_header_only_gives_no_rows() -> None:
    assert parse(f"{HEADER_EN}\n") == []


# --- values ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "born"),
    [
        ("1950-04-01", date(1950, 4, 1)),
        ("19500401", date(1950, 4, 1)),
        ("1950/04/01", date(1950, 4, 1)),
        ("1950/4/1", date(1950, 4, 1)),  # as a spreadsheet saves it
        ("１９５０／０４／０１", date(1950, 4, 1)),  # 全角
        ("１９５００４０１", date(1950, 4, 1)),
        ("2020-02-29", date(2020, 2, 29)),  # a leap day
        (" 1950-04-01 ", date(1950, 4, 1)),
        ("", None),  # unknown
        (TODAY.isoformat(), TODAY),  # born today
        ("1900-01-01", date(1900, 1, 1)),  # the earliest accepted
    ],
)
def test_birth_date_accepted(value: str, born: date | None) -> None:
    result = only(row_with(birth_date=value))
    assert isinstance(result, ResidentRow)
    assert result.birth_date == born


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ((TODAY + timedelta(days=1)).isoformat(), "in the future"),
        ("2099-01-01", "in the future"),
        ("1899-12-31", "before 1900-01-01"),
        ("2021-02-29", "not a calendar date"),
        ("2021-13-01", "not a calendar date"),
        ("20210431", "not a calendar date"),
        ("2021-00-10", "not a calendar date"),
        ("50-04-01", "must be a date"),
        ("1950.04.01", "must be a date"),
        ("1950-04/01", "must be a date"),  # mixed separators
        ("1950041", "must be a date"),
        ("S25.4.1", "must be a date"),  # 和暦 is not one of the contract's forms
        ("昭和25年4月1日", "must be a date"),
    ],
)
def test_birth_date_refused(value: str, reason: str) -> None:
    assert reason in errors_of(only(row_with(birth_date=value)))["birth_date"]


@pytest.mark.parametrize(
    ("value", "sex"),
    [
        ("M", Sex.MALE),
        ("F", Sex.FEMALE),
        ("U", Sex.UNKNOWN),
        ("1", Sex.MALE),
        ("2", Sex.FEMALE),
        ("9", Sex.UNKNOWN),
        ("", Sex.UNKNOWN),
        ("男", Sex.MALE),
        ("女", Sex.FEMALE),
        ("２", Sex.FEMALE),
    ],
)
def test_sex(value: str, sex: Sex) -> None:
    result = only(row_with(sex=value))
    assert isinstance(result, ResidentRow) and result.sex is sex


@pytest.mark.parametrize("value", ["0", "3", "X", "male"])
def test_sex_refused(value: str) -> None:
    assert "must be one of" in errors_of(only(row_with(sex=value)))["sex"]


def test_a_missing_sex_column_is_unknown() -> None:
    result = only("resident_id,name,name_kana\nR1,a,b\n")
    assert isinstance(result, ResidentRow) and result.sex is Sex.UNKNOWN


@pytest.mark.parametrize(("value", "stored"), [(MN1, MN1), ("１２３４５６７８９０１８", MN1), ("", None), (" ", None)])
def test_my_number_accepted(value: str, stored: str | None) -> None:
    result = only(row_with(my_number=value))
    assert isinstance(result, ResidentRow) and result.my_number == stored


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("123456789017", "check digit"),
        ("123456789019", "check digit"),
        ("12345678901", "12 digits"),
        ("1234567890180", "12 digits"),
        ("1234 5678 9018", "12 digits"),
        ("12345678901A", "12 digits"),
    ],
)
def test_my_number_refused_without_showing_it(value: str, reason: str) -> None:
    message = errors_of(only(row_with(my_number=value)))["my_number"]
    assert reason in message
    digits = "".join(c for c in value if c.isdigit())
    assert digits[-4:] not in message and digits[:4] not in message


@pytest.mark.parametrize(
    ("value", "stored"), [("0000000001", "0000000001"), ("９９９９９９９９９９", "9999999999"), ("", None)]
)
def test_coupon_number_accepted(value: str, stored: str | None) -> None:
    result = only(row_with(coupon_number=value))
    assert isinstance(result, ResidentRow) and result.coupon_number == stored


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("000000001", "10 digits"),
        ("00000000001", "10 digits"),
        ("0000000000", "never issued"),
        ("00000-0001", "10 digits"),
    ],
)
def test_coupon_number_refused(value: str, reason: str) -> None:
    assert reason in errors_of(only(row_with(coupon_number=value)))["coupon_number"]


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("resident_id", "A" * 64, True),
        ("resident_id", "A" * 65, False),
        ("resident_id", "0012-3_4.5", True),
        ("resident_id", "１２３", True),  # 全角 digits become 123
        ("resident_id", "R 1", False),
        ("resident_id", "R/1", False),
        ("resident_id", "宛名1", False),
        ("resident_id", "", False),
        ("name", "山" * 100, True),
        ("name", "山" * 101, False),
        ("name", "", False),
        ("name", "　", False),  # a full-width space only
        ("name_kana", "ア" * 200, True),
        ("name_kana", "ア" * 201, False),
        ("name_kana", "", False),
        ("address", "住" * 300, True),
        ("address", "住" * 301, False),
        ("address", "", True),
        ("name", "山田\x00太郎", False),
        ("address", "東京都\x1b千代田区", False),
        ("address", "東京都\t千代田区", True),
    ],
)
def test_text_fields(field: str, value: str, ok: bool) -> None:
    result = only(row_with(**{field: value}))
    if ok:
        assert isinstance(result, ResidentRow), result
    else:
        assert field in errors_of(result)


def test_half_width_kana_becomes_full_width_and_names_are_kept() -> None:
    result = only(row_with(name_kana="ﾔﾏﾀﾞ ﾀﾛｳ", name="髙橋　一郎", address=""))
    assert isinstance(result, ResidentRow)
    assert (result.name_kana, result.name, result.address) == ("ヤマダ タロウ", "髙橋　一郎", None)


def test_all_errors_of_a_row_at_once() -> None:
    text = f"{HEADER_EN}\n,,,2021-02-30,7,123,x,1\n"
    assert set(errors_of(only(text))) == {
        "resident_id",
        "name",
        "name_kana",
        "birth_date",
        "sex",
        "my_number",
        "coupon_number",
    }


def test_my_number_is_not_in_a_rows_repr() -> None:
    assert MN1 not in repr(EXPECTED)


# --- repeats within the file -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "field"),
    [
        (f"R1,b,b,,,{MN2},,0000000002", "resident_id"),
        (f"R2,b,b,,,{MN1},,0000000002", "my_number"),
        ("R2,b,b,,,１２３４５６７８９０１８,,0000000002", "my_number"),  # the same number in 全角
        (f"R2,b,b,,,{MN2},,0000000001", "coupon_number"),
        (f"R2,b,b,,,{MN2},,0000000002", None),
    ],
)
def test_a_key_twice_is_an_error_on_the_later_row(second: str, field: str | None) -> None:
    rows = parse(f"{HEADER_EN}\nR1,a,a,,,{MN1},,0000000001\n{second}\n")
    assert isinstance(rows[0][1], ResidentRow)
    if field is None:
        assert isinstance(rows[1][1], ResidentRow)
    else:
        assert list(errors_of(rows[1][1])) == [field]
        assert MN1 not in str(rows[1][1])


def test_a_key_on_a_bad_row_still_counts() -> None:
    rows = parse(f"{HEADER_EN}\nR1,a,a,1950-02-30,,{MN1},,\nR1,a,a,,,{MN2},,\nR3,a,a,,,{MN1},,\n")
    assert list(errors_of(rows[0][1])) == ["birth_date"]
    assert list(errors_of(rows[1][1])) == ["resident_id"]
    assert list(errors_of(rows[2][1])) == ["my_number"]


@pytest.mark.parametrize("size", [1, 3, 50])
def test_repeats_checked_a_chunk_at_a_time_say_what_row_by_row_says(size: int) -> None:
    rng = random.Random(3)
    rows: list[RowKeys] = [
        (
            rng.choice([None, f"R{rng.randrange(40)}", str(rng.randrange(40))]),
            rng.choice([None, rng.randrange(1, 40)]),
            rng.choice([None, f"{rng.randrange(1, 40):010d}"]),
        )
        for _ in range(200)
    ]
    one, chunked = Repeats(), Repeats()
    expected = {i: found for i, keys in enumerate(rows) if (found := one.check(keys))}
    got: dict[int, list[RowError]] = {}
    for start in range(0, len(rows), size):
        part = rows[start : start + size]
        in_chunk = chunked.check_chunk(
            [r for r, _, _ in part],
            [text_key(r) if r is not None else 0 for r, _, _ in part],
            [n or 0 for _, n, _ in part],
            [int(c) if c is not None else 0 for _, _, c in part],
        )
        got |= {start + i: errors for i, errors in in_chunk.items()}
    assert got == expected
    assert expected  # the table has repeats of every kind
    assert {e.field for errors in expected.values() for e in errors} == {"resident_id", "my_number", "coupon_number"}


def test_empty_my_numbers_and_coupons_do_not_repeat() -> None:
    rows = parse(f"{HEADER_EN}\nR1,a,a,,,,,\nR2,a,a,,,,,\n")
    assert all(isinstance(r, ResidentRow) for _, r in rows)


# --- row numbers -------------------------------------------------------------------------------------------------


def test_row_numbers_count_the_header_blank_lines_and_records() -> None:
    text = (
        f"{HEADER_EN}\r\n"
        "R1,a,a,,,,,\r\n"
        "\r\n"  # row 3: blank, skipped but counted
        'R2,a,a,,,,"東京都\r\n千代田区",\r\n'  # row 4: one record over two lines
        "R3,a,,,,,,\r\n"  # row 5: bad
        "R4,a,a"  # row 6: short, no final newline
    )
    rows = parse(text)
    assert [n for n, _ in rows] == [2, 4, 5, 6]
    assert isinstance(rows[1][1], ResidentRow) and rows[1][1].address == "東京都\r\n千代田区"
    assert errors_of(rows[2][1]) == {"name_kana": "is required"}
    assert rows[3][1] == ResidentRow("R4", "a", "a", None, Sex.UNKNOWN)


def test_a_row_csv_cannot_read_is_reported_and_reading_goes_on() -> None:
    rows = parse(f"{HEADER_EN}\nR1,a,a\nR2,{'a' * 200_000},a\nR3,a,a\n")
    assert rows[0][1] == ResidentRow("R1", "a", "a", None, Sex.UNKNOWN)
    assert rows[1][0] == 3 and "not readable as CSV" in errors_of(rows[1][1])["row"]
    assert rows[2] == (4, ResidentRow("R3", "a", "a", None, Sex.UNKNOWN))


# --- streaming ---------------------------------------------------------------------------------------------------


class EndlessResidents:
    """A file too long to hold: rows are made as they are read, and reading is counted."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self.buffer = f"{HEADER_JA}\r\n".encode("cp932")
        self.n = 0

    def read(self, size: int, /) -> bytes:
        assert size > 0, "the parser must never ask for the whole file"
        while len(self.buffer) < size:
            self.n += 1
            self.buffer += f"R{self.n},山田 太郎,ヤマダ タロウ,19500401,2,,,\r\n".encode("cp932")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        self.bytes_read += len(data)
        return data


def test_rows_come_before_the_file_ends() -> None:
    stream = EndlessResidents()
    first = list(islice(parse_resident_csv(stream, today=TODAY, chunk_size=4096), 1000))
    assert first[-1] == (1001, ResidentRow("R1000", "山田 太郎", "ヤマダ タロウ", date(1950, 4, 1), Sex.FEMALE))
    assert stream.bytes_read < 100_000
