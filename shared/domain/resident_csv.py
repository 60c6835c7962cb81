"""The resident CSV (ARCHITECTURE.md "The resident CSV"): 住民基本台帳/予防接種台帳 exports, row by row.

Each data row becomes a :class:`ResidentRow` (exactly what the resident ``PUT`` accepts) or the list of
what is wrong with it, field by field. Row 1 is the header, so the first resident is row 2. Messages never
contain a My Number.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
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
    column_rows,
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
    repeats = Repeats()
    for row_number, values in resident_values(stream, chunk_size):
        if isinstance(values, list):
            yield row_number, values
            continue
        result, keys = check_row(values, today)
        yield row_number, repeats.merge(result, keys)


def resident_values(stream: ByteStream, chunk_size: int = CHUNK_SIZE) -> Iterator[Parsed[RawRow]]:
    """The first stage of :func:`parse_resident_csv`: each row's raw values in :data:`COLUMNS` order (or why
    it could not be read). The bulk importer checks the values in other processes (:func:`check_row`) and
    the repeats in file order (:class:`Repeats`)."""
    return column_rows(stream, COLUMNS, chunk_size)  # type: ignore[return-value]


# Raw values in COLUMNS order ("" for a column the file lacks).
RawRow = tuple[str, ...]
# What a row is known by in the file, for the repeats: its resident id, My Number key and coupon number, each
# None when that value is missing or invalid (an invalid value is its own error, never a repeat).
RowKeys = tuple[str | None, int | None, str | None]
COLUMN_ORDER = {column.name: i for i, column in enumerate(COLUMNS)}


# A checked row's values in ResidentRow's field order (resident_id, name, name_kana, birth_date, sex, my_number,
# address, coupon_number): what a bulk import's workers use, without building an object per row.
CheckedValues = tuple[str, str, str, date | None, Sex, str | None, str | None, str | None]


def check_row(values: RawRow, today: date) -> tuple[ResidentRow | list[RowError], RowKeys]:
    """One row's values checked on their own (no I/O, no state): the row or its errors, and its keys."""
    result, keys = check_values(values, today)
    if isinstance(result, list):
        return result, keys
    return ResidentRow(*result), keys


def check_values(values: RawRow, today: date) -> tuple[CheckedValues | list[RowError], RowKeys]:
    """:func:`check_row`, the row as a plain tuple (:data:`CheckedValues`)."""
    errors: list[RowError] = []
    raw_id, raw_name, raw_kana, raw_born, raw_sex, raw_number, raw_address, raw_coupon = values
    resident_id = normalised(raw_id)
    id_key: str | None = None
    if not resident_id:
        errors.append(RowError("resident_id", "is required"))
    elif RESIDENT_ID.fullmatch(resident_id) is None:
        errors.append(RowError("resident_id", "must be 1-64 letters, digits, '.', '_' or '-'"))
    else:
        id_key = resident_id
    name = text_value(raw_name, "name", MAX_NAME, errors, required=True)
    name_kana = text_value(normalised(raw_kana), "name_kana", MAX_NAME_KANA, errors, required=True)
    birth_date = _birth_date(normalised(raw_born), today, errors)
    sex = _sex(raw_sex, errors)
    my_number = normalised(raw_number)
    number_key: int | None = None
    if my_number:
        if problem := my_number_problem(my_number):
            errors.append(RowError("my_number", f"My Number {problem}"))  # never the number itself
        else:
            number_key = int(my_number) + 1  # + 1: 000000000000 is a key too
    address = text_value(raw_address, "address", MAX_ADDRESS, errors, required=False)
    coupon_number = normalised(raw_coupon)
    coupon_key: str | None = None
    if coupon_number:
        if problem := coupon_number_problem(coupon_number):
            errors.append(RowError("coupon_number", f"coupon number {problem}"))
        else:
            coupon_key = coupon_number
    keys = (id_key, number_key, coupon_key)
    if errors:
        return errors, keys
    return (
        resident_id,
        name,
        name_kana,
        birth_date,
        sex,
        my_number or None,
        address or None,
        coupon_number or None,
    ), keys


def int_keys(keys: RowKeys) -> tuple[int, int, int]:
    """A row's keys as :class:`KeySet` takes them, 0 for none: the resident id's :func:`text_key`, the My Number's
    key, the coupon number's value (a valid one is exactly 10 digits: its value with the leading zeros is it)."""
    resident_id, number_key, coupon = keys
    return (
        0 if resident_id is None else text_key(resident_id),
        number_key or 0,
        0 if coupon is None else int(coupon),
    )


class Repeats:
    """The keys of every earlier row whose key itself was valid, even if the row had other errors: the file
    says two different things about that resident, and a person must decide which is true. My Numbers (12
    digits) and coupon numbers (10, never all zeros) are their own exact keys."""

    def __init__(self, expected_rows: int = 0) -> None:
        self.resident_ids = KeySet(expected_rows)
        self.my_numbers = KeySet(expected_rows)
        self.coupon_numbers = KeySet(expected_rows)

    def check(self, keys: RowKeys) -> list[RowError]:
        """Remember the row's keys; an error for each key an earlier row had (:meth:`check_chunk` of one row)."""
        id_key, number_key, coupon_key = int_keys(keys)
        return self.check_chunk([keys[0]], [id_key], [number_key], [coupon_key]).get(0, [])

    def check_chunk(
        self,
        id_texts: Sequence[str | None],
        id_keys: Sequence[int],
        number_keys: Sequence[int],
        coupon_keys: Sequence[int],
    ) -> dict[int, list[RowError]]:
        """Remember a chunk of rows' keys, given as :func:`int_keys` makes them (``id_texts``: the resident ids
        themselves, for the messages); the errors by position in the chunk, only for rows with a repeat."""
        found: dict[int, list[RowError]] = {}
        for i in self.resident_ids.add_many(id_keys):
            found.setdefault(i, []).append(
                RowError("resident_id", f"{id_texts[i]} appears on an earlier row of this file")
            )
        for i in self.my_numbers.add_many(number_keys):
            found.setdefault(i, []).append(
                RowError("my_number", "this My Number appears on an earlier row of this file")
            )
        for i in self.coupon_numbers.add_many(coupon_keys):
            message = f"{coupon_keys[i]:010d} appears on an earlier row of this file"
            found.setdefault(i, []).append(RowError("coupon_number", message))
        return found

    def merge(self, result: ResidentRow | list[RowError], keys: RowKeys) -> ResidentRow | list[RowError]:
        """``result`` with the row's repeats added, its errors in column order."""
        found = self.check(keys)
        if not found:
            return result
        errors = found if isinstance(result, ResidentRow) else result + found
        return sorted(errors, key=lambda e: COLUMN_ORDER.get(e.field, 0))


def _birth_date(value: str, today: date, errors: list[RowError]) -> date | None:
    if not value:
        return None  # unknown: the open data has doses of such people
    try:
        born = parse_date(value)
    except ValueError as exc:
        errors.append(RowError("birth_date", str(exc)))
        return None
    if born > today:
        errors.append(RowError("birth_date", f"{born} is in the future"))
    elif born < EARLIEST_BIRTH_DATE:
        errors.append(RowError("birth_date", f"{born} is before {EARLIEST_BIRTH_DATE}"))
    return born


def _sex(value: str, errors: list[RowError]) -> Sex:
    try:
        return parse_sex(value)
    except ValueError as exc:
        errors.append(RowError("sex", str(exc)))
        return Sex.UNKNOWN
