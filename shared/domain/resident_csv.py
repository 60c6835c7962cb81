"""The resident CSV (ARCHITECTURE.md "The resident CSV"): 住民基本台帳/予防接種台帳 exports, row by row.

Each data row becomes a :class:`ResidentRow` (exactly what the resident ``PUT`` accepts) or the list of
what is wrong with it, field by field. Row 1 is the header, so the first resident is row 2. Messages never
contain a My Number.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date

from shared.domain.codes import my_number_problem
from shared.domain.coupon import coupon_number_problem
from shared.domain.csv_stream import (
    CHUNK_SIZE,
    EARLIEST_BIRTH_DATE,
    ByteStream,
    Column,
    Parsed,
    RowError,
    named_rows,
    normalised,
    parse_date,
    text_value,
)
from shared.domain.keyset import KeySet, text_key
from shared.domain.sex import Sex, parse_sex

COLUMNS = (
    Column("resident_id", ("個別宛名番号", "宛名番号"), required=True),
    Column("name", ("氏名",), required=True),
    Column("name_kana", ("氏名カナ", "カナ氏名", "フリガナ"), required=True),
    Column("birth_date", ("生年月日",)),
    Column("sex", ("性別",)),
    Column("my_number", ("個人番号", "マイナンバー")),
    Column("address", ("住所",)),
    Column("coupon_number", ("券番号", "接種券番号")),
)

# The same limits as the resident PUT (services/registry: path pattern and ResidentIn), so that a row the
# file accepts is a row the API would accept.
RESIDENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_NAME = 100
MAX_NAME_KANA = 200
MAX_ADDRESS = 300


@dataclass(frozen=True, slots=True)
class ResidentRow:
    resident_id: str  # 個別宛名番号
    name: str
    name_kana: str
    birth_date: date | None
    sex: Sex
    my_number: str | None = field(default=None, repr=False)  # never in a repr, so never in a log line
    address: str | None = None
    coupon_number: str | None = None


def parse_resident_csv(
    stream: ByteStream, *, today: date, chunk_size: int = CHUNK_SIZE
) -> Iterator[Parsed[ResidentRow]]:
    """``(row_number, ResidentRow)`` or ``(row_number, [RowError, ...])`` for each data row of ``stream``.

    Raises :class:`~shared.domain.csv_stream.CsvFileError` when iteration starts, before any row, if the
    file has no header or lacks a required column. ``today`` is Japan's day: a birth date after it is
    refused. A resident id, My Number or coupon number already seen on an earlier row is an error on the
    later row (the earlier one stands).
    """
    return _ResidentParser(today).parse(stream, chunk_size)


class _ResidentParser:
    def __init__(self, today: date) -> None:
        self.today = today
        # Keys of every earlier row whose key itself was valid, even if the row had other errors: the file
        # says two different things about that resident, and a person must decide which is true. My Numbers
        # (12 digits) and coupon numbers (10, never all zeros) are their own exact keys.
        self.resident_ids = KeySet()
        self.my_numbers = KeySet()
        self.coupon_numbers = KeySet()

    def parse(self, stream: ByteStream, chunk_size: int) -> Iterator[Parsed[ResidentRow]]:
        for row_number, values in named_rows(stream, COLUMNS, chunk_size):
            yield row_number, values if isinstance(values, list) else self._row(values)

    def _row(self, values: dict[str, str]) -> ResidentRow | list[RowError]:
        errors: list[RowError] = []
        resident_id = self._resident_id(normalised(values["resident_id"]), errors)
        name = text_value(values["name"], "name", MAX_NAME, errors, required=True)
        name_kana = text_value(normalised(values["name_kana"]), "name_kana", MAX_NAME_KANA, errors, required=True)
        birth_date = self._birth_date(normalised(values.get("birth_date", "")), errors)
        sex = _sex(values.get("sex", ""), errors)
        my_number = self._my_number(normalised(values.get("my_number", "")), errors)
        address = text_value(values.get("address", ""), "address", MAX_ADDRESS, errors, required=False)
        coupon_number = self._coupon_number(normalised(values.get("coupon_number", "")), errors)
        if errors:
            return errors
        return ResidentRow(
            resident_id=resident_id,
            name=name,
            name_kana=name_kana,
            birth_date=birth_date,
            sex=sex,
            my_number=my_number or None,
            address=address or None,
            coupon_number=coupon_number or None,
        )

    def _resident_id(self, value: str, errors: list[RowError]) -> str:
        if not value:
            errors.append(RowError("resident_id", "is required"))
        elif RESIDENT_ID.fullmatch(value) is None:
            errors.append(RowError("resident_id", "must be 1-64 letters, digits, '.', '_' or '-'"))
        elif not self.resident_ids.add(text_key(value)):
            errors.append(RowError("resident_id", f"{value} appears on an earlier row of this file"))
        return value

    def _birth_date(self, value: str, errors: list[RowError]) -> date | None:
        if not value:
            return None  # unknown: the open data has doses of such people
        try:
            born = parse_date(value)
        except ValueError as exc:
            errors.append(RowError("birth_date", str(exc)))
            return None
        if born > self.today:
            errors.append(RowError("birth_date", f"{born} is in the future"))
        elif born < EARLIEST_BIRTH_DATE:
            errors.append(RowError("birth_date", f"{born} is before {EARLIEST_BIRTH_DATE}"))
        return born

    def _my_number(self, value: str, errors: list[RowError]) -> str:
        if not value:
            return value
        if problem := my_number_problem(value):
            errors.append(RowError("my_number", f"My Number {problem}"))  # never the number itself
        elif not self.my_numbers.add(int(value) + 1):  # + 1: 000000000000 is a key too
            errors.append(RowError("my_number", "this My Number appears on an earlier row of this file"))
        return value

    def _coupon_number(self, value: str, errors: list[RowError]) -> str:
        if not value:
            return value
        if problem := coupon_number_problem(value):
            errors.append(RowError("coupon_number", f"coupon number {problem}"))
        elif not self.coupon_numbers.add(int(value)):
            errors.append(RowError("coupon_number", f"{value} appears on an earlier row of this file"))
        return value


def _sex(value: str, errors: list[RowError]) -> Sex:
    try:
        return parse_sex(value)
    except ValueError as exc:
        errors.append(RowError("sex", str(exc)))
        return Sex.UNKNOWN
