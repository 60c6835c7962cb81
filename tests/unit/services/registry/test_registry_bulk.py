"""A bulk import's prepared lines (services/registry/bulk.py) say exactly what the row-by-row path stores for a
new resident: the same history entry, the same coupon.issued event, a sealed My Number that opens."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

from services.registry.bulk import (
    BINARY_HEADER,
    BINARY_TRAILER,
    COUPON_COLUMNS,
    DIRECTORY_COLUMNS,
    EVENTS_PER_MESSAGE,
    HISTORY_COLUMNS,
    RESIDENT_COLUMNS,
    ChunkJob,
    Lines,
    outbox_copy,
    prepare,
)
from services.registry.crypto import MyNumberVault
from services.registry.service import history_changes, snapshot
from services.registry.settings import RegistrySettings
from shared import events
from shared.domain.codes import my_number_check_digit
from shared.domain.keyset import text_key
from shared.events import CouponEvent, CouponEventType, CouponState, coupon_events_from_bytes

NOW = datetime(2026, 11, 25, 12, 0, 0, 123000, tzinfo=UTC)
MN = "123456789018"
FULL = ("R1", 'Y"a\\ma\tda 太郎', "ヤマダ タロウ", "1950-04-01", "1", MN, "東京都\n千代田区", "0000000001")
BARE = ("R2", "山田 花子", "ﾔﾏﾀﾞ ﾊﾅｺ", "", "2", "", "", "")
BAD = ("R3", "", "ヤマダ", "19500231", "7", "12345678901", "", "")


def unescape(field: str) -> str | None:
    if field == "\\N":
        return None
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\":
            out.append({"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}[field[i + 1]])
            i += 2
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def my_number(n: int) -> str:
    body = f"{n:011d}"
    return body + str(my_number_check_digit(body))


def rows_of(data: bytes, columns: tuple[str, ...]) -> list[dict[str, str | None]]:
    lines = data.decode().split("\n")
    assert lines[-1] == ""
    return [dict(zip(columns, map(unescape, line.split("\t")), strict=True)) for line in lines[:-1]]


def job(*rows: tuple[str, ...], keys_only: bool = False) -> ChunkJob:
    numbered = [(n, values) for n, values in enumerate(rows, start=2)]
    return ChunkJob("131016", "import:x", NOW.isoformat(), date(2026, 11, 25), numbered, keys_only)  # type: ignore[arg-type]


def test_prepared_lines_match_the_row_by_row_path() -> None:
    vault = MyNumberVault(RegistrySettings())
    out = prepare(job(FULL, BARE, BAD), vault)
    assert out.numbers == [2, 3, 4]
    assert out.errors[0] is None and out.errors[1] is None
    assert {e.field for e in out.errors[2] or []} == {"name", "birth_date", "sex", "my_number"}
    assert out.id_texts == ["R1", "R2", "R3"]
    assert list(out.id_keys) == [text_key("R1"), text_key("R2"), text_key("R3")]
    assert list(out.number_keys) == [int(MN) + 1, 0, 0]  # R3's number has a wrong check digit: no key
    assert list(out.coupon_keys) == [1, 0, 0]

    taro, hanako = rows_of(out.residents.take([0, 1]), RESIDENT_COLUMNS)
    assert taro["name"] == 'Y"a\\ma\tda 太郎' and taro["address"] == "東京都\n千代田区"
    assert (taro["birth_date"], taro["sex"], taro["coupon_number"], taro["version"]) == (
        "1950-04-01",
        "M",
        "0000000001",
        "1",
    )
    assert hanako["name_kana"] == "ヤマダ ハナコ" and hanako["my_number_hash"] is None and hanako["address"] is None
    ciphertext = bytes.fromhex(str(taro["my_number_ciphertext"])[2:])
    assert vault.open(str(taro["my_number_key_id"]), ciphertext, context="131016/R1") == MN
    assert bytes.fromhex(str(taro["my_number_hash"])[2:]) == vault.keyed_hash(MN) == out.hashes[0]
    assert MN not in out.residents.data.decode() and MN not in out.history.data.decode()

    # History: what service.history_changes says for a resident seen for the first time.
    for line, values in zip(rows_of(out.history.take([0, 1]), HISTORY_COLUMNS), (FULL, BARE), strict=True):
        stored = next(r for r in rows_of(out.residents.data, RESIDENT_COLUMNS) if r["resident_id"] == values[0])
        after = {k: stored.get(k) for k in ("name", "name_kana", "birth_date", "sex", "address", "coupon_number")}
        after |= {"my_number_hash": stored["my_number_hash"], "my_number_last4": stored["my_number_last4"]}
        assert json.loads(str(line["changes"])) == history_changes(None, snapshot(after))
        assert (line["version"], line["changed_by"]) == ("1", "import:x")

    # One coupon and its coupon.issued event: byte for byte what CouponEvent writes.
    (coupon,) = rows_of(out.coupon_lines.take([0, 1]), COUPON_COLUMNS)
    assert (coupon["coupon_number"], coupon["resident_id"], coupon["sex"], coupon["version"]) == (
        "0000000001",
        "R1",
        "M",
        "1",
    )
    (payload,) = out.outbox.pieces([0, 1])
    event = CouponEvent.from_bytes(payload)
    expected = CouponEvent(
        event_id=event.event_id,
        occurred_at=NOW,
        type=CouponEventType.ISSUED,
        municipality="131016",
        coupon_number="0000000001",
        version=1,
        state=CouponState(resident_id="R1", sex="M", birth_date=date(1950, 4, 1)),
    )
    assert payload == expected.to_bytes() and event.event_id.version == 4
    (entry,) = rows_of(out.directory.take([0, 1]), DIRECTORY_COLUMNS)
    assert (entry["municipality_code"], entry["resident_id"]) == ("131016", "R1")


def test_outbox_rows_carry_a_thousand_events_each() -> None:
    vault = MyNumberVault(RegistrySettings())
    rows = [(f"R{i}", "名", "メイ", "", "1", "", "", f"{i + 1:010d}") for i in range(2500)]
    out = prepare(job(*rows), vault)
    data = outbox_copy("131016", out.outbox.pieces(range(2500)), NOW.isoformat())
    assert data.startswith(BINARY_HEADER) and data.endswith(BINARY_TRAILER)
    body, lines = data[len(BINARY_HEADER) : -len(BINARY_TRAILER)], []
    while body:  # each tuple: its field count, then each field's length and bytes
        assert int.from_bytes(body[:2], "big") == 4
        body, fields = body[2:], []
        for _ in range(4):
            size = int.from_bytes(body[:4], "big")
            fields.append(body[4 : 4 + size])
            body = body[4 + size :]
        lines.append(fields)
    batches = [coupon_events_from_bytes(payload) for _, _, payload, _ in lines]
    assert [len(b) for b in batches] == [1000, 1000, 500]
    assert [e.coupon_number for b in batches for e in b] == [f"{i + 1:010d}" for i in range(2500)]
    assert len({event_id for event_id, *_ in lines}) == 3 and {key for _, key, *_ in lines} == {b"131016"}
    microseconds = {int.from_bytes(at, "big") for *_, at in lines}
    assert microseconds == {(NOW - datetime(2000, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)}
    assert outbox_copy("131016", [], NOW.isoformat()) == b""
    # The workers keep their own copy of the shared limit (they do not import pydantic): the same number.
    assert EVENTS_PER_MESSAGE == events.EVENTS_PER_MESSAGE


def test_keys_only_and_taking_rows() -> None:
    out = prepare(job(FULL, BARE, keys_only=True), MyNumberVault(RegistrySettings()))
    assert out.errors == [None, None] and out.residents.data == b"" and out.hashes == [None, None]
    lines = Lines.of(["a\n", "", "ccc\n"])
    assert lines.take([0, 1, 2]) == b"a\nccc\n" and lines.take([2]) == b"ccc\n" and lines.pieces([1, 2]) == [b"ccc\n"]


def test_sorted_lines_keep_track_of_their_rows() -> None:
    lines = Lines.sorted_of(["b\n", "", "a\n", "c\n"])
    assert lines.take(range(4)) == b"a\nb\nc\n"
    assert lines.take([0, 3]) == b"b\nc\n" and lines.take([1, 2]) == b"a\n" and lines.take([1]) == b""
    assert lines.pieces([0, 2]) == [b"a\n", b"b\n"]


def test_directory_entries_come_in_key_order() -> None:
    rows = [(f"R{n}", "山田", "ヤマダ", "", "1", my_number(n), "", "") for n in range(1, 40)]
    out = prepare(job(*rows), MyNumberVault(RegistrySettings()))
    entries = rows_of(out.directory.take(range(len(rows))), DIRECTORY_COLUMNS)
    keys = [str(entry["my_number_hash"]) for entry in entries]
    assert keys == sorted(keys) and len(set(keys)) == len(rows)
    # A subset still gives each kept row its own entry.
    kept = rows_of(out.directory.take([3, 7]), DIRECTORY_COLUMNS)
    assert sorted(str(entry["resident_id"]) for entry in kept) == ["R4", "R8"]
