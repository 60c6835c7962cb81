"""The dose CSV a mass vaccination site uploads (ARCHITECTURE.md, ``POST /api/v1/dose-imports``), row by row.

Each row becomes a :class:`DoseRow` (the fields of a batch item) or the list of what is wrong with it. This
reads the row's shape only: whether the coupon line, the date and the product can be true is the dose
rules' judgement (:func:`shared.domain.dose_rules.check_admissible`), applied by the batch path every dose
goes through, so a CSV row and a tablet's dose are judged by one set of rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date

from shared.domain.csv_stream import (
    CHUNK_SIZE,
    ByteStream,
    Column,
    Parsed,
    RowError,
    named_rows,
    normalised,
    parse_date,
    text_value,
)

COLUMNS = (
    Column("client_id", required=True),
    Column("coupon", required=True),
    Column("dose_number", required=True),
    Column("vaccinated_on", required=True),
    Column("vaccine", required=True),
    Column("lot_number", required=True),
    Column("venue"),
    Column("doctor"),
    Column("medical_worker"),
)

# The batch item's limits (services/records schemas; 接種会場名 ≤ 30, 接種医師名 ≤ 20 and ロット番号 ≤ 20 are
# VRS's own export layout), so that a row the file accepts is an item the batch accepts.
MAX_CLIENT_ID = 100
MAX_VACCINE = 20  # ワクチンメーカー ≤ 20 in the export layout; product codes are far shorter
MAX_LOT_NUMBER = 20
MAX_VENUE = 30
MAX_DOCTOR = 20
_WHOLE_NUMBER = re.compile(r"[0-9]{1,3}")
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False, "": False}


@dataclass(frozen=True, slots=True)
class DoseRow:
    client_id: str  # the row's idempotency key
    coupon: str  # the 18-digit line, not yet checked
    dose_number: int
    vaccinated_on: date
    vaccine: str
    lot_number: str
    venue: str | None = None
    doctor: str | None = None
    medical_worker: bool = False


def parse_dose_csv(stream: ByteStream, *, chunk_size: int = CHUNK_SIZE) -> Iterator[Parsed[DoseRow]]:
    """``(row_number, DoseRow)`` or ``(row_number, [RowError, ...])`` for each data row; row 1 is the header.

    Raises :class:`~shared.domain.csv_stream.CsvFileError` when iteration starts on a file without a header
    or without a required column. A ``client_id`` seen on an earlier row is an error on the later row.
    """
    seen: set[str] = set()
    for row_number, values in named_rows(stream, COLUMNS, chunk_size):
        yield row_number, values if isinstance(values, list) else _row(values, seen)


def _row(values: dict[str, str], seen: set[str]) -> DoseRow | list[RowError]:
    errors: list[RowError] = []
    client_id = text_value(values["client_id"], "client_id", MAX_CLIENT_ID, errors, required=True)
    if client_id and client_id in seen:
        errors.append(RowError("client_id", f"{client_id} appears on an earlier row of this file"))
    seen.add(client_id)
    coupon = normalised(values["coupon"])
    if not coupon:
        errors.append(RowError("coupon", "is required"))
    dose_number = _dose_number(normalised(values["dose_number"]), errors)
    vaccinated_on = _vaccinated_on(normalised(values["vaccinated_on"]), errors)
    vaccine = text_value(values["vaccine"], "vaccine", MAX_VACCINE, errors, required=True)
    lot_number = text_value(values["lot_number"], "lot_number", MAX_LOT_NUMBER, errors, required=True)
    venue = text_value(values.get("venue", ""), "venue", MAX_VENUE, errors, required=False)
    doctor = text_value(values.get("doctor", ""), "doctor", MAX_DOCTOR, errors, required=False)
    medical_worker = _BOOLEANS.get(normalised(values.get("medical_worker", "")).lower())
    if medical_worker is None:
        errors.append(RowError("medical_worker", "must be true, false, 1, 0 or empty"))
    if errors or dose_number is None or vaccinated_on is None or medical_worker is None:
        return errors
    return DoseRow(
        client_id=client_id,
        coupon=coupon,
        dose_number=dose_number,
        vaccinated_on=vaccinated_on,
        vaccine=vaccine,
        lot_number=lot_number,
        venue=venue or None,
        doctor=doctor or None,
        medical_worker=medical_worker,
    )


def _dose_number(value: str, errors: list[RowError]) -> int | None:
    if not value:
        errors.append(RowError("dose_number", "is required"))
        return None
    if _WHOLE_NUMBER.fullmatch(value) is None:
        errors.append(RowError("dose_number", "must be a whole number of at most 3 digits"))
        return None
    return int(value)  # whether 1..10: the dose rules say


def _vaccinated_on(value: str, errors: list[RowError]) -> date | None:
    if not value:
        errors.append(RowError("vaccinated_on", "is required"))
        return None
    try:
        return parse_date(value)
    except ValueError as exc:
        errors.append(RowError("vaccinated_on", str(exc)))
        return None
