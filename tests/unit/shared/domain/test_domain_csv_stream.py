"""What both CSV parsers share: encoding detection fed in any chunking, and the batches an importer writes."""

from __future__ import annotations

from datetime import date

import pytest

from shared.domain.csv_stream import Batch, CsvFileError, DetectingDecoder, RowError, batches, parse_date

JAPANESE = "氏名,山田 太郎,ヤマダ タロウ,東京都千代田区\r\n"


def feed(data: bytes, chunk_size: int) -> tuple[str, str | None]:
    decoder = DetectingDecoder()
    text = "".join(decoder.decode(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size))
    return text + decoder.decode(b"", final=True), decoder.encoding


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 7, 64, 1 << 16])
@pytest.mark.parametrize(
    ("data", "text", "encoding"),
    [
        (JAPANESE.encode("utf-8"), JAPANESE, "utf-8"),
        (b"\xef\xbb\xbf" + JAPANESE.encode("utf-8"), JAPANESE, "utf-8"),  # the BOM is not text
        (JAPANESE.encode("cp932"), JAPANESE, "cp932"),
        ("髙橋,﨑,①\r\n".encode("cp932"), "髙橋,﨑,①\r\n", "cp932"),  # characters only cp932 has, not Shift_JIS
        (b"a,b\r\n" * 100 + JAPANESE.encode("cp932"), "a,b\r\n" * 100 + JAPANESE, "cp932"),
        (b"a,b\r\n" * 100 + JAPANESE.encode("utf-8"), "a,b\r\n" * 100 + JAPANESE, "utf-8"),
        (b"a,b\r\n", "a,b\r\n", None),  # ASCII only: nothing to decide, both read it the same
        ("ア".encode("cp932"), "ア", "cp932"),  # no newline at all: decided at the end
        ("ア".encode(), "ア", "utf-8"),
        (b"\xef\xbb", "\ufffdｻ", "cp932"),  # two bytes of a BOM and nothing else: not UTF-8
        # UTF-8 with a damaged byte is still UTF-8: the byte alone becomes U+FFFD (a row error for the parsers).
        ("氏名,山".encode() + b"\xff" + "田\r\n".encode(), "氏名,山\ufffd田\r\n", "utf-8"),
        ("アイウエ".encode() + b"\xff\r\n", "アイウエ\ufffd\r\n", "utf-8"),  # 4 characters for the one bad byte
        ("アイウ".encode() + b"\xff\r\n", ("アイウ".encode() + b"\xff\r\n").decode("cp932", "replace"), "cp932"),  # 3
        (b"", "", None),
    ],
)
def test_detection(data: bytes, text: str, encoding: str | None, chunk_size: int) -> None:
    assert feed(data, chunk_size) == (text, encoding)


def test_a_kanji_lead_byte_at_a_chunk_end_waits_for_the_line() -> None:
    # 0xE6 starts 漢 in UTF-8 and is a kanji lead byte in cp932: one byte alone proves nothing.
    decoder = DetectingDecoder()
    data = "漢字,カナ\r\n".encode("cp932")
    assert decoder.decode(data[:1]) == ""
    assert decoder.encoding is None
    assert decoder.decode(data[1:]) == "漢字,カナ\r\n"
    assert decoder.encoding == "cp932"


@pytest.mark.parametrize("bom", [b"\xff\xfe", b"\xfe\xff"])
def test_utf16_is_refused(bom: bytes) -> None:
    with pytest.raises(CsvFileError, match="UTF-16"):
        DetectingDecoder().decode(bom + "a,b".encode("utf-16-le"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2021-06-01", date(2021, 6, 1)),
        ("20210601", date(2021, 6, 1)),
        ("2021/06/01", date(2021, 6, 1)),
        ("2021/6/1", date(2021, 6, 1)),
        ("2021-6-01", date(2021, 6, 1)),
        ("2024-02-29", date(2024, 2, 29)),
        ("0001-01-01", date(1, 1, 1)),  # the parser reads; the callers judge plausibility
    ],
)
def test_parse_date(value: str, expected: date) -> None:
    assert parse_date(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "2021-06", "2021-06-01T00:00", "2021-006-01", "2021/06-01", "202161", "2021601", "21-06-01", "2023-02-29"],
)
def test_parse_date_refused(value: str) -> None:
    with pytest.raises(ValueError, match="date"):
        parse_date(value)


ERR = [RowError("name", "is required")]


@pytest.mark.parametrize(
    ("parsed", "size", "expected"),
    [
        ([], 2, []),
        ([(2, "a")], 2, [Batch(rows=[(2, "a")], last_row=2)]),
        ([(2, "a"), (3, "b")], 2, [Batch(rows=[(2, "a"), (3, "b")], last_row=3)]),
        (
            [(2, "a"), (3, "b"), (4, "c")],
            2,
            [Batch(rows=[(2, "a"), (3, "b")], last_row=3), Batch(rows=[(4, "c")], last_row=4)],
        ),
        (
            [(2, "a"), (3, ERR), (5, "b"), (6, ERR)],
            2,
            [Batch(rows=[(2, "a"), (5, "b")], errors=[(3, ERR)], last_row=5), Batch(errors=[(6, ERR)], last_row=6)],
        ),
        ([(2, ERR), (3, ERR)], 1, [Batch(errors=[(2, ERR), (3, ERR)], last_row=3)]),
        ([(2, "a"), (3, "b")], 1, [Batch(rows=[(2, "a")], last_row=2), Batch(rows=[(3, "b")], last_row=3)]),
    ],
)
def test_batches(parsed: list[tuple[int, str | list[RowError]]], size: int, expected: list[Batch[str]]) -> None:
    assert list(batches(parsed, size)) == expected


def test_batches_never_hold_more_than_size_and_lose_nothing() -> None:
    parsed: list[tuple[int, str | list[RowError]]] = [(n, ERR if n % 7 == 0 else str(n)) for n in range(2, 1002)]
    out = list(batches(parsed, 50))
    assert all(len(b.rows) <= 50 for b in out)
    assert [r for b in out for r in b.rows] == [p for p in parsed if not isinstance(p[1], list)]
    assert [e for b in out for e in b.errors] == [p for p in parsed if isinstance(p[1], list)]
    assert [b.last_row for b in out] == sorted(b.last_row for b in out)
    assert out[-1].last_row == 1001


@pytest.mark.parametrize("size", [0, -1])
def test_a_batch_holds_at_least_one_row(size: int) -> None:
    with pytest.raises(ValueError, match="at least one"):
        list(batches([(2, "a")], size))
