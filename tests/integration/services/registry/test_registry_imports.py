"""Resident CSV imports on PostgreSQL with two shards: good and bad rows, the same file twice, Shift_JIS,
a second My Number, and an import resumed after a crash."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import pytest
from sqlalchemy import select, text, update

from services.registry.models import MyNumberDirectoryEntry, ResidentImport
from services.registry.repository import ResidentRepository
from services.registry.settings import RegistrySettings
from shared.domain.codes import my_number_check_digit
from shared.events import CouponEventType
from tests.integration.services.registry.registry_support import (
    CHIYODA,
    HEADER,
    SAPPORO,
    Registry,
    auth,
    serve,
)


class PowerCut(BaseException):
    """The process dies here (SystemExit would stop the test's event loop itself)."""


def my_number(n: int) -> str:
    first = f"{n:011d}"
    return first + str(my_number_check_digit(first))


def csv_of(*rows: str, encoding: str = "utf-8") -> bytes:
    return (HEADER + "".join(r + "\n" for r in rows)).encode(encoding)


GOOD = [
    f"000123,山田 太郎,ヤマダ タロウ,19500401,1,{my_number(1)},東京都千代田区千代田1-1,0000000001",
    "000124,山田 花子,ﾔﾏﾀﾞ ﾊﾅｺ,1952/07/15,2,,東京都千代田区千代田1-1,",
    f"000125,佐藤 一郎,サトウ イチロウ,1960-01-02,9,{my_number(2)},,0000000002",
    f"000126,鈴木 次郎,スズキ ジロウ,,男,{my_number(3)},,0000000003",
]


@pytest.fixture
async def pooled(registry_settings: RegistrySettings) -> AsyncIterator[Registry]:
    """Registry whose imports run in worker processes whatever the file's size (as a large file's would)."""
    async for served in serve(registry_settings.model_copy(update={"import_workers_min_bytes": 0})):
        yield served


@pytest.mark.parametrize("where", ["in_process", "workers"])
async def test_good_rows_are_stored_and_bad_rows_reported(
    where: str, registry: Registry, registry_settings: RegistrySettings
) -> None:
    if where == "workers":
        served = serve(registry_settings.model_copy(update={"import_workers_min_bytes": 0}))
        registry = await anext(served)
    try:
        await _good_and_bad(registry)
    finally:
        if where == "workers":
            await served.aclose()


async def _good_and_bad(registry: Registry) -> None:
    bad = [
        "000127,,タナカ,19700101,1,,,",  # row 6: no name
        f"000128,田中,タナカ,1970-02-30,1,{my_number(1)},,",  # row 7: no such date, My Number repeated
        "000129,田中,タナカ,19700101,7,12345678901,,0000000000",  # row 8: sex, My Number, coupon number
        "000123,田中,タナカ,19700101,1,,,",  # row 9: resident id on an earlier row
    ]
    status = await registry.import_csv(csv_of(*GOOD, *bad))
    assert status["status"] == "done"
    assert (status["rows_total"], status["rows_ok"], status["rows_failed"]) == (8, 4, 4)
    by_row: dict[int, set[str]] = {}
    for e in status["errors"]:
        by_row.setdefault(e["row"], set()).add(e["field"])
    assert by_row == {
        6: {"name"},
        7: {"birth_date", "my_number"},
        8: {"sex", "my_number", "coupon_number"},
        9: {"resident_id"},
    }
    assert all(my_number(1) not in e["message"] for e in status["errors"])

    residents = {r.resident_id: r for r in await registry.residents()}
    assert sorted(residents) == ["000123", "000124", "000125", "000126"]
    taro = residents["000123"]
    assert (taro.name, taro.sex, str(taro.birth_date), taro.coupon_number) == (
        "山田 太郎",
        "M",
        "1950-04-01",
        "0000000001",
    )
    assert residents["000124"].name_kana == "ヤマダ ハナコ" and residents["000124"].my_number_hash is None
    assert taro.my_number_last4 == my_number(1)[-4:] and taro.my_number_ciphertext is not None
    vault = registry.app.state.vault
    assert vault.open(taro.my_number_key_id, taro.my_number_ciphertext, context=f"{CHIYODA}/000123") == my_number(1)

    # Coupons and their events went through the outbox, one issued event per coupon.
    events = await registry.events()
    assert sorted((e.coupon_number, e.type, e.version) for e in events) == [
        (f"000000000{i}", CouponEventType.ISSUED, 1) for i in (1, 2, 3)
    ]
    assert {e.coupon_number: e.state.resident_id for e in events}["0000000003"] == "000126"
    async with registry.databases.main.sessionmaker() as session:
        directory = (await session.execute(select(MyNumberDirectoryEntry))).scalars().all()
    assert sorted(e.resident_id for e in directory) == ["000123", "000125", "000126"]
    # Each stored resident has its first history entry, naming the import.
    (first,) = await registry.history("000123")
    assert first.version == 1 and first.changed_by == f"import:{status['import_id']}"
    assert first.changes["my_number"] == {"changed": True, "last4": my_number(1)[-4:]}
    assert my_number(1) not in str(first.changes)


async def test_the_same_file_twice_changes_nothing(registry: Registry) -> None:
    data = csv_of(*GOOD)
    first = await registry.import_csv(data)
    before = [(r.resident_id, r.version, r.updated_at) for r in await registry.residents()]
    events = len(await registry.events())
    again = await registry.import_csv(data)
    assert again["import_id"] == first["import_id"] and again["rows_ok"] == 4

    # A different file (a trailing blank line) with the same rows: a new import that changes nothing.
    other = await registry.import_csv(data + b"\n")
    assert other["import_id"] != first["import_id"] and (other["rows_ok"], other["rows_failed"]) == (4, 0)
    assert [(r.resident_id, r.version, r.updated_at) for r in await registry.residents()] == before
    assert len(await registry.events()) == events
    assert len(await registry.history("000123")) == 1


async def test_an_update_by_import_announces_the_change(registry: Registry) -> None:
    await registry.import_csv(csv_of(*GOOD))
    changed = f"000123,山田 太郎,ヤマダ タロウ,19500401,2,{my_number(1)},東京都千代田区千代田1-1,0000000011"
    status = await registry.import_csv(csv_of(changed))
    assert status["rows_ok"] == 1, status
    taro = next(r for r in await registry.residents() if r.resident_id == "000123")
    assert (taro.sex, taro.coupon_number, taro.version) == ("F", "0000000011", 2)
    latest = {e.coupon_number: e for e in await registry.events()}
    assert latest["0000000001"].type is CouponEventType.INVALIDATED
    assert latest["0000000001"].state.invalid_reason == "reissued" and latest["0000000001"].state.sex == "F"
    assert latest["0000000011"].type is CouponEventType.ISSUED
    history = await registry.history("000123")
    assert [h.version for h in history] == [1, 2]
    assert history[1].changes["sex"] == {"before": "M", "after": "F"} and "my_number" not in history[1].changes


async def test_shift_jis_with_bom_less_utf8_and_another_shard(registry: Registry) -> None:
    sjis = csv_of("A1,髙橋 﨑子,タカハシ サキコ,19800101,2,,,", encoding="cp932")
    assert (await registry.import_csv(sjis))["rows_ok"] == 1
    assert (await registry.residents())[0].name == "髙橋 﨑子"
    bom = b"\xef\xbb\xbf" + csv_of("S1,札幌 太郎,サッポロ タロウ,,1,,,0000000001")
    status = await registry.import_csv(bom, code=SAPPORO)
    assert status["rows_ok"] == 1
    assert [r.resident_id for r in await registry.residents(SAPPORO)] == ["S1"]
    assert [e.coupon_number for e in await registry.events(SAPPORO)] == ["0000000001"]


async def stored_upload(registry: Registry, data: bytes, *, code: str = CHIYODA) -> str:
    """Post a file and leave its import stored, not started (as a registry that stopped before running it)."""
    importer = registry.importer
    start = importer.start
    importer.start = lambda import_id: None  # type: ignore[method-assign]
    try:
        r = await registry.client.post(
            f"/api/v1/municipalities/{code}/resident-imports",
            content=data,
            headers=auth(code) | {"Content-Type": "text/csv"},
        )
    finally:
        importer.start = start  # type: ignore[method-assign]
    assert r.status_code == 202, r.text
    import_id: str = r.json()["import_id"]
    return import_id


async def test_an_upload_is_stored_sealed_until_its_import_ends(registry: Registry) -> None:
    # The file holds My Numbers: the main database, and so its WAL and backups, must never hold them in the clear.
    import_id = await stored_upload(registry, csv_of(*GOOD))
    select_pieces = text("SELECT key_id, data FROM resident_import_chunks WHERE import_id = :i ORDER BY seq")
    async with registry.databases.main.sessionmaker() as session:
        pieces = (await session.execute(select_pieces, {"i": import_id})).all()
        storage = (
            await session.execute(
                text(
                    "SELECT attstorage::text FROM pg_attribute "
                    "WHERE attrelid = 'resident_import_chunks'::regclass AND attname = 'data'"
                )
            )
        ).scalar_one()
    stored = b"".join(bytes(data) for _, data in pieces)
    assert [key_id for key_id, _ in pieces] == [registry.settings.my_number_active_key]
    for n in (1, 2, 3):
        assert my_number(n).encode() not in stored
    assert "山田".encode() not in stored and b"000123" not in stored
    assert storage == "e"  # ciphertext does not compress: PostgreSQL does not try

    registry.importer.start(import_id)
    await registry.importer.wait(import_id)
    status = (
        await registry.client.get(f"/api/v1/municipalities/{CHIYODA}/resident-imports/{import_id}", headers=auth())
    ).json()
    assert (status["status"], status["rows_ok"]) == ("done", len(GOOD))
    assert {r.resident_id: r.my_number_last4 for r in await registry.residents()}["000123"] == my_number(1)[-4:]
    async with registry.databases.main.sessionmaker() as session:
        assert (await session.execute(select_pieces, {"i": import_id})).all() == []  # the file is gone with it


async def test_a_file_without_its_required_columns_is_refused_as_a_whole(registry: Registry) -> None:
    status = await registry.import_csv("氏名,性別\n山田,1\n".encode())
    assert status["status"] == "done" and status["rows_ok"] == 0
    assert status["errors"][0]["row"] == 1 and "resident_id" in status["errors"][0]["message"]


async def test_a_second_resident_with_the_same_my_number_is_refused(registry: Registry) -> None:
    await registry.import_csv(csv_of(*GOOD))
    status = await registry.import_csv(csv_of(f"000200,別人,ベツジン,,1,{my_number(1)},,0000000001"))
    assert status["rows_failed"] == 1
    assert {e["field"] for e in status["errors"]} == {"my_number", "coupon_number"}
    assert "000123" in next(e["message"] for e in status["errors"] if e["field"] == "my_number")

    body = {"name": "別人", "name_kana": "ベツジン", "sex": "M", "my_number": my_number(3)}
    r = await registry.client.put(f"/api/v1/municipalities/{CHIYODA}/residents/000201", json=body, headers=auth())
    assert r.status_code == 409 and r.json()["detail"].startswith("my_number:")
    # Another municipality may register the same person (they moved): the directory links both.
    r = await registry.client.put(f"/api/v1/municipalities/{SAPPORO}/residents/X9", json=body, headers=auth(SAPPORO))
    assert r.status_code == 201


async def test_new_known_and_conflicting_rows_in_one_chunk(pooled: Registry) -> None:
    """Rows of residents never seen are copied as prepared; a known resident, a number or coupon another
    resident holds, go the careful way: one chunk holding all of them stores what the row-by-row rules say."""
    registry = pooled
    await registry.import_csv(csv_of(*GOOD))
    mixed = [
        f"000123,山田 太郎,ヤマダ タロウ,19500401,2,{my_number(1)},東京都千代田区千代田1-1,0000000001",  # known: sex
        f"000300,新人,シンジン,19900101,1,{my_number(300)},,0000000300",  # new
        f"000301,別人,ベツジン,,1,{my_number(2)},,",  # new, but 000125 holds this My Number
        "000302,別人,ベツジン,,1,,,0000000003",  # new, but 000126 holds this coupon
    ]
    status = await registry.import_csv(csv_of(*mixed))
    assert (status["rows_ok"], status["rows_failed"]) == (2, 2), status
    assert {(e["row"], e["field"]) for e in status["errors"]} == {(4, "my_number"), (5, "coupon_number")}
    residents = {r.resident_id: r for r in await registry.residents()}
    assert residents["000123"].sex == "F" and residents["000123"].version == 2
    assert residents["000300"].version == 1 and "000301" not in residents and "000302" not in residents
    latest = {e.coupon_number: e for e in await registry.events()}
    assert latest["0000000001"].type is CouponEventType.HOLDER_CHANGED and latest["0000000001"].version == 2
    assert latest["0000000300"].type is CouponEventType.ISSUED and latest["0000000300"].state.resident_id == "000300"
    assert [h.version for h in await registry.history("000300")] == [1]


async def test_a_resident_written_meanwhile_makes_the_chunk_go_the_careful_way(pooled: Registry) -> None:
    """A writer that stores a new row's resident between the importer's checks and its COPY: the chunk is
    redone row by row's rules, and nothing is doubled."""
    registry = pooled
    await registry.import_csv(csv_of(GOOD[1]))  # 000124: no My Number, no coupon
    original, write = ResidentRepository.known, registry.importer._write_once
    attempts: list[tuple[bool, bool]] = []

    async def blind(self: ResidentRepository, municipality_code: str, resident_ids: Sequence[str]) -> set[str]:
        return set()  # as if 000124 had been stored just after the check

    async def counted(*args: Any, direct: bool, checked: bool, **kwargs: Any) -> None:
        attempts.append((direct, checked))
        await write(*args, direct=direct, checked=checked, **kwargs)

    ResidentRepository.known = blind  # type: ignore[method-assign]
    registry.importer._write_once = counted  # type: ignore[method-assign]
    try:
        status = await registry.import_csv(csv_of(*GOOD))
    finally:
        ResidentRepository.known = original  # type: ignore[method-assign]
    assert (status["rows_ok"], status["rows_failed"]) == (4, 0), status
    # The first chunk (000123-000125): copied unchecked, it collided; checked (blindly), it collided again;
    # redone row by row. The next chunk is checked first: this import met a stored key.
    assert attempts[:4] == [(True, False), (True, True), (False, True), (True, True)]
    residents = await registry.residents()
    assert [(r.resident_id, r.version) for r in residents] == [(f"00012{i}", 1) for i in range(3, 7)]
    events = await registry.events()
    assert sorted(e.coupon_number for e in events) == ["0000000001", "0000000002", "0000000003"]


async def test_a_crash_mid_import_resumes_from_the_last_committed_batch(registry_settings: RegistrySettings) -> None:
    registry_settings = registry_settings.model_copy(update={"import_workers_min_bytes": 0})
    rows = [f"R{i:03d},名前{i},ナマエ,19700101,1,{my_number(100 + i)},,{1000 + i:010d}" for i in range(20)]
    rows[13] = "R013,,ナマエ,19700101,1,,,"  # a bad row after the crash point
    data = csv_of(*rows)

    served: AsyncGenerator[Registry, None] = serve(registry_settings)
    registry = await anext(served)
    importer = registry.importer
    original = importer._write
    written = 0

    async def crash_after_three_batches(*args: object, **kwargs: object) -> None:
        nonlocal written
        if written == 3:
            raise PowerCut  # not an Exception: the importer does not retry it
        written += 1
        await original(*args, **kwargs)  # type: ignore[arg-type]

    importer._write = crash_after_three_batches  # type: ignore[method-assign]
    r = await registry.client.post(
        f"/api/v1/municipalities/{CHIYODA}/resident-imports",
        content=data,
        headers=auth() | {"Content-Type": "text/csv"},
    )
    import_id = r.json()["import_id"]
    with contextlib.suppress(PowerCut):
        await importer.wait(import_id)
    status = (
        await registry.client.get(f"/api/v1/municipalities/{CHIYODA}/resident-imports/{import_id}", headers=auth())
    ).json()
    assert (status["status"], status["rows_ok"]) == ("running", 9)  # three batches of three
    assert len(await registry.residents()) == 9
    # The fourth batch's shard rows committed but not its progress (a crash between the two commits).
    async with registry.databases.main.sessionmaker() as session, session.begin():
        await session.execute(update(ResidentImport).values(last_row=7, rows_ok=6, rows_total=6))
    await served.aclose()

    # A fresh process resumes it on start.
    restarted = serve(registry_settings)
    registry = await anext(restarted)
    try:
        await registry.importer.wait(import_id)
        status = (
            await registry.client.get(f"/api/v1/municipalities/{CHIYODA}/resident-imports/{import_id}", headers=auth())
        ).json()
        assert (status["status"], status["rows_total"], status["rows_ok"], status["rows_failed"]) == ("done", 20, 19, 1)
        assert [e["row"] for e in status["errors"]] == [15]
        residents = await registry.residents()
        assert len(residents) == 19 and all(r.version == 1 for r in residents)
        events = await registry.events()
        assert len(events) == 19 and len({e.coupon_number for e in events}) == 19  # none announced twice
    finally:
        await restarted.aclose()
