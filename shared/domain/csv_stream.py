"""Reading the CSV files municipalities and vaccination sites upload, as a stream.

A 住民基本台帳 export can hold millions of rows, so nothing here holds the file: bytes are read in chunks,
decoded incrementally and handed to :mod:`csv` line by line. What the resident and dose files share lives
here: encoding detection, header mapping, value normalisation and the error shapes.

Encoding: a UTF-8 byte-order mark means UTF-8. Otherwise the first chunk that holds non-ASCII bytes decides,
judged on complete lines: UTF-8 if those lines are UTF-8 but for a few damaged bytes (at least
``UTF8_CHARACTERS_PER_BAD_BYTE`` valid multi-byte characters for each invalid byte), else cp932 (Shift_JIS with
the Windows extensions every 住基 system writes). Japanese text in cp932 seldom forms a valid UTF-8 sequence
and never many for each byte that is not one, so one bad byte in a UTF-8 file no longer turns the whole file
into mojibake. ASCII before that point reads the same in both. Bytes that are invalid in the detected encoding
become U+FFFD and are reported as a row error naming the field, so one damaged row never stops a file.
"""

from __future__ import annotations

import codecs
import csv
import functools
import itertools
import operator
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

CHUNK_SIZE = 1 << 16
_UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_NON_ASCII = re.compile(rb"[\x80-\xff]")
REPLACEMENT = "\ufffd"
# Invalid bytes decoded with ``surrogateescape`` (one each), and the characters of valid multi-byte sequences.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_MULTI_BYTE = re.compile("[^\x00-\x7f\udc80-\udcff]")
# cp932's kana and kanji form a valid UTF-8 sequence now and then, but among more bytes that form none (the
# bench's generated 住基 file: at most one for every six in a line); a UTF-8 line with a damaged byte has dozens.
UTF8_CHARACTERS_PER_BAD_BYTE = 4


class ByteStream(Protocol):
    """What the parsers read from: an open binary file, an upload's spooled file, ``io.BytesIO``."""

    def read(self, size: int, /) -> bytes: ...


class Encoding(StrEnum):
    UTF8 = "utf-8"
    CP932 = "cp932"  # Shift_JIS with the NEC and IBM extensions (髙, 﨑, ①) that 住基 systems write


@dataclass(frozen=True, slots=True)
class RowError:
    field: str
    message: str


class CsvFileError(ValueError):
    """The file as a whole cannot be read (no header, a required column missing): nothing was imported."""


class DetectingDecoder:
    """An incremental decoder that picks UTF-8 or cp932 from the data itself (see the module docstring)."""

    def __init__(self) -> None:
        self.encoding: Encoding | None = None
        self._decoder: codecs.IncrementalDecoder | None = None
        self._pending = b""
        self._at_start = True

    def decode(self, data: bytes, final: bool = False) -> str:
        if self._decoder is not None:
            return self._decoder.decode(data, final)
        pending = self._pending + data
        if self._at_start:
            if len(pending) < len(_UTF8_BOM) and not final:
                self._pending = pending
                return ""
            self._at_start = False
            if pending.startswith(_UTF16_BOMS):
                raise CsvFileError("the file is UTF-16; save it as UTF-8 or Shift_JIS (cp932)")
            if pending.startswith(_UTF8_BOM):
                return self._choose(Encoding.UTF8).decode(pending[len(_UTF8_BOM) :], final)
        match = _NON_ASCII.search(pending)
        if match is None:
            self._pending = b""
            return pending.decode("ascii")
        ascii_part, rest = pending[: match.start()], pending[match.start() :]
        end_of_line = rest.rfind(b"\n")
        if end_of_line < 0 and not final and len(rest) < CHUNK_SIZE:
            # Judge complete lines only: a chunk can end inside a character, and a lone cp932 lead byte
            # at the end would pass as the start of a UTF-8 sequence.
            self._pending = rest
            return ascii_part.decode("ascii")
        sample = rest[: end_of_line + 1] if end_of_line >= 0 else rest
        complete = end_of_line >= 0 or final
        encoding = Encoding.UTF8 if _is_utf8(sample, complete=complete) else Encoding.CP932
        return ascii_part.decode("ascii") + self._choose(encoding).decode(rest, final)

    def _choose(self, encoding: Encoding) -> codecs.IncrementalDecoder:
        self.encoding = encoding
        self._pending = b""
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        return self._decoder


def _is_utf8(sample: bytes, *, complete: bool) -> bool:
    # Not complete: a character cut at the sample's end stays in the decoder, not counted against UTF-8.
    text = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape").decode(sample, final=complete)
    bad = len(_ESCAPED_BYTE.findall(text))
    return bad == 0 or len(_MULTI_BYTE.findall(text)) >= UTF8_CHARACTERS_PER_BAD_BYTE * bad


def decoded_lines(stream: ByteStream, decoder: DetectingDecoder, chunk_size: int = CHUNK_SIZE) -> Iterator[str]:
    """Lines of text, each ending in its newline (``\\r\\n`` kept whole, as :mod:`csv` wants)."""
    # A chunk's lines at a time, walked by C code: a generator resumed per line cost a tenth of the reading.
    return itertools.chain.from_iterable(_line_lists(stream, decoder, chunk_size))


def _line_lists(stream: ByteStream, decoder: DetectingDecoder, chunk_size: int) -> Iterator[list[str]]:
    tail = ""
    while True:
        chunk = stream.read(chunk_size)
        text = tail + decoder.decode(chunk, final=not chunk)
        lines = text.split("\n")
        tail = lines.pop()
        yield [line + "\n" for line in lines]
        if not chunk:
            break
    if tail:
        yield [tail]


def csv_records(
    stream: ByteStream, decoder: DetectingDecoder, chunk_size: int = CHUNK_SIZE
) -> Iterator[list[str] | RowError]:
    """Each record of the file, in order (a blank line is an empty record, so numbering follows the
    file's rows); a record :mod:`csv` cannot read becomes a :class:`RowError` and reading goes on."""
    reader = csv.reader(decoded_lines(stream, decoder, chunk_size), strict=False)
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield RowError("row", f"is not readable as CSV ({exc})")
            continue
        yield record


@dataclass(frozen=True, slots=True)
class Column:
    """A column the parser reads: its English name, its Japanese 住基/台帳 names, whether it is required."""

    name: str
    aliases: tuple[str, ...] = ()
    required: bool = False


def named_rows(
    stream: ByteStream, columns: Sequence[Column], chunk_size: int = CHUNK_SIZE
) -> Iterator[tuple[int, dict[str, str] | list[RowError]]]:
    """Each data row as ``{column name: raw value}`` (a column the row is too short for is ""), or the
    errors that kept it from being read. Blank rows are skipped but keep their number, as a spreadsheet
    shows them. Raises :class:`CsvFileError` when iteration starts on a file without a usable header."""
    names = [c.name for c in columns]
    for row_number, values in column_rows(stream, columns, chunk_size, keep_missing=False):
        if isinstance(values, list):
            yield row_number, values
        else:
            yield row_number, {name: value for name, value in zip(names, values, strict=True) if value is not None}


def column_rows(
    stream: ByteStream, columns: Sequence[Column], chunk_size: int = CHUNK_SIZE, *, keep_missing: bool = True
) -> Iterator[tuple[int, tuple[str | None, ...] | list[RowError]]]:
    """Like :func:`named_rows`, each row as a tuple of raw values in ``columns`` order: cheap to send to
    another process. A column the header lacks is "" (``keep_missing=False``: None)."""
    decoder = DetectingDecoder()
    records = csv_records(stream, decoder, chunk_size)
    header = next(records, None)
    if header is None or isinstance(header, RowError) or not any(cell.strip() for cell in header):
        raise CsvFileError("the file has no header row (row 1 names the columns)")
    positions = map_header(header, columns)
    absent = "" if keep_missing else None
    at = [positions.get(c.name) for c in columns]
    # The common row holds every column the header named: its values in one C call. A shorter row, or a
    # column the header lacks, goes the general way.
    width = max((i for i in at if i is not None), default=-1) + 1
    pick = operator.itemgetter(*at) if None not in at and len(at) > 1 else None  # (one item: not a tuple)
    for row_number, record in enumerate(records, start=2):
        if isinstance(record, RowError):
            yield row_number, [record]
            continue
        if not "".join(record).strip():  # blank, or only spaces
            continue
        size = len(record)
        values: tuple[str | None, ...]
        if pick is not None and size >= width:
            values = pick(record)
            joined = "".join(values)  # type: ignore[arg-type]
        else:
            values = tuple(absent if i is None else record[i] if i < size else "" for i in at)
            joined = "".join(v for v in values if v)
        if REPLACEMENT in joined:  # one C-level scan: the rare case costs the loop
            encoding = decoder.encoding or "ASCII"
            yield (
                row_number,
                [
                    RowError(column.name, f"holds bytes that are not valid {encoding}")
                    for column, value in zip(columns, values, strict=True)
                    if value and REPLACEMENT in value
                ],
            )
            continue
        yield row_number, values


def _header_key(cell: str) -> str:
    return unicodedata.normalize("NFKC", cell).strip().lower()


def map_header(header: Sequence[str], columns: Sequence[Column]) -> dict[str, int]:
    """Column name → index in the row, by header name in any order; unknown columns are ignored."""
    index_of = {_header_key(alias): column.name for column in columns for alias in (column.name, *column.aliases)}
    positions: dict[str, int] = {}
    for position, cell in enumerate(header):
        name = index_of.get(_header_key(cell))
        if name is None:
            continue
        if name in positions:
            raise CsvFileError(f"column {name} appears twice in the header ({header[positions[name]]}, {cell})")
        positions[name] = position
    missing = [c for c in columns if c.required and c.name not in positions]
    if missing:
        names = ", ".join(f"{c.name} ({'/'.join(c.aliases)})" if c.aliases else c.name for c in missing)
        raise CsvFileError(f"the header has no required column {names}")
    return positions


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def has_control_characters(value: str) -> bool:
    """NUL and other control characters (tab and line breaks aside) are never part of a name or address."""
    return _CONTROL.search(value) is not None


def text_value(value: str, name: str, limit: int, errors: list[RowError], *, required: bool) -> str:
    """A free-text value (name, address, venue...), trimmed; its errors appended to ``errors``."""
    value = value.strip()
    if required and not value:
        errors.append(RowError(name, "is required"))
    elif len(value) > limit:
        errors.append(RowError(name, f"is longer than {limit} characters"))
    elif has_control_characters(value):
        errors.append(RowError(name, "holds control characters"))
    return value


def normalised(value: str) -> str:
    """NFKC and trimmed: full-width digits and letters (全角 ２０２１／０６／０１) as their ASCII forms."""
    return unicodedata.normalize("NFKC", value).strip() if not value.isascii() else value.strip()


EARLIEST_BIRTH_DATE = date(1900, 1, 1)  # before the oldest person alive when vaccination began (born 1903)
DATE_FORMS = "YYYY-MM-DD, YYYYMMDD or YYYY/MM/DD"
_DATE = re.compile(r"(\d{4})(?:([-/])(\d{1,2})\2(\d{1,2})|(\d{2})(\d{2}))")


# A file of a million residents holds a few tens of thousands of distinct birth days (a dose file, fewer
# vaccination days): most values were parsed a few rows earlier. 40,000 entries are ~8 MB.
@functools.lru_cache(maxsize=40_000)
def parse_date(value: str) -> date:
    """A date in one of the three forms (already normalised); ``ValueError`` saying why not otherwise.

    Spreadsheets drop leading zeros when they save a date (1990/1/5), so one-digit months and days are read
    in the separated forms too.
    """
    match = _DATE.fullmatch(value)
    if match is None:
        raise ValueError(f"must be a date as {DATE_FORMS}")
    year, _, month, day, packed_month, packed_day = match.groups()
    try:
        return date(int(year), int(month or packed_month), int(day or packed_day))
    except ValueError:
        raise ValueError(f"{value} is not a calendar date") from None


T = TypeVar("T")
Parsed = tuple[int, T | list[RowError]]


@dataclass(slots=True)
class Batch(Generic[T]):
    """Up to ``size`` good rows, the bad rows met since the previous batch, and how far the file was read."""

    rows: list[tuple[int, T]] = field(default_factory=list)
    errors: list[tuple[int, list[RowError]]] = field(default_factory=list)
    last_row: int = 0  # every row up to this one is in this batch or an earlier one


def batches(parsed: Iterable[Parsed[T]], size: int) -> Iterator[Batch[T]]:
    """Group a parser's output for the importer: each batch is one multi-row write plus its errors.

    ``last_row`` lets an importer record its progress with the batch it commits, and on a resumed import
    skip the rows up to it; the final batch may be empty of rows but still carries the last errors.
    """
    if size < 1:
        raise ValueError("a batch holds at least one row")
    batch: Batch[T] = Batch()
    for row_number, result in parsed:
        batch.last_row = row_number
        if isinstance(result, list):
            batch.errors.append((row_number, result))
        else:
            batch.rows.append((row_number, result))
            if len(batch.rows) == size:
                yield batch
                batch = Batch(last_row=row_number)
    if batch.rows or batch.errors:
        yield batch
