"""The transfer disclosure log (情報提供等記録): every transfer lookup that read another municipality's records of a
person leaves a row, in the lookup's own transaction, that both municipalities read back by their own resident id.

registry and records served for real — records over HTTP as in production — on SQLite (the embedded stack) and on
PostgreSQL with two shards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from services.records.service import Submission
from services.registry.crypto import MyNumberVault
from services.registry.models import TransferDisclosure
from shared.db import utcnow
from shared.domain.japan_time import JAPAN, japan_today
from shared.domain.period import kept_since
from shared.internal import InternalClient
from tests.integration.services.records.records_support import dose, recorder, records_databases
from tests.integration.services.registry.registry_support import (
    CHIYODA,
    SAPPORO,
    Registry,
    auth,
    database_maker,
    migrated_registry,
    records_over_http,
    serve,
)
from tests.integration.services.registry.test_registry_imports import my_number

OSAKA = "271004"  # no shard pinned: assigned on first sight
PERSON = {"name": "山田 花子", "name_kana": "ヤマダ ハナコ", "birth_date": "1950-04-02", "sex": "F"}
MOVER, STAYER, NOBODY = my_number(41), my_number(42), my_number(99)
BATCH = f"/api/v1/municipalities/{CHIYODA}/transfer-lookups/batch"


@dataclass
class Stack:
    registry: Registry
    record: Callable[..., Any]


@pytest.fixture(params=["sqlite", "postgresql"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    make_database = database_maker(request, tmp_path)
    async for records_dbs in records_databases(make_database):
        async with records_over_http(records_dbs) as url:
            settings = await migrated_registry(make_database, records_url=url)
            async for registry in serve(settings):
                yield Stack(registry, recorder(records_dbs))


async def put(registry: Registry, code: str, resident_id: str, **body: Any) -> None:
    r = await registry.client.put(
        f"/api/v1/municipalities/{code}/residents/{resident_id}", json=PERSON | body, headers=auth(code)
    )
    assert r.status_code in (200, 201), r.text


async def move_out(registry: Registry, code: str, resident_id: str) -> None:
    r = await registry.client.post(
        f"/api/v1/municipalities/{code}/residents/{resident_id}/move-out",
        json={"moved_to": CHIYODA, "moved_on": "2021-08-31"},
        headers=auth(code),
    )
    assert r.status_code == 200, r.text


async def moved_to_chiyoda(stack: Stack) -> None:
    """MOVER lived in Osaka (no dose) and Sapporo (two doses) and is now Chiyoda's C1; STAYER is Sapporo's S2."""
    registry = stack.registry
    await put(registry, OSAKA, "O1", my_number=MOVER, coupon_number="0000000003")
    await put(registry, SAPPORO, "S1", my_number=MOVER, coupon_number="0000000001")
    await put(registry, SAPPORO, "S2", my_number=STAYER, coupon_number="0000000002")
    town = {"municipality": SAPPORO}
    await stack.record(
        Submission("k1", dose("0000000001", **town)),
        Submission("k2", dose("0000000001", dose_number=2, vaccinated_on=date(2021, 6, 22), **town)),
        Submission("k3", dose("0000000002", **town)),
    )
    await move_out(registry, OSAKA, "O1")
    await move_out(registry, SAPPORO, "S1")
    await put(registry, CHIYODA, "C1", my_number=MOVER, coupon_number="0000000077")


async def lookup(registry: Registry, code: str, number: str, basis: str = "consent", request_id: str = "r") -> Any:
    return await registry.client.post(
        f"/api/v1/municipalities/{code}/transfer-lookups",
        json={"my_number": number, "legal_basis": basis},
        headers=auth(code) | {"X-Request-ID": request_id},
    )


async def batch(registry: Registry, items: list[tuple[str, str]], request_id: str) -> Any:
    lookups = [{"client_id": str(i), "my_number": n, "legal_basis": b} for i, (n, b) in enumerate(items)]
    return await registry.client.post(
        BATCH,
        json={"lookups": lookups},
        headers=auth(CHIYODA)
        | {"X-Access-Purpose": ",".join(sorted({b for _, b in items})), "X-Request-ID": request_id},
    )


async def logged(registry: Registry) -> list[tuple[Any, ...]]:
    """Every row of the log as stored, oldest first, without its id and time."""
    async with registry.databases.main.sessionmaker() as session:
        rows = (await session.execute(select(TransferDisclosure).order_by(TransferDisclosure.id))).scalars()
        return [
            (
                r.request_id,
                r.caller_municipality,
                r.caller_resident_id,
                r.source_municipality,
                r.source_resident_id,
                r.legal_basis,
                r.doses,
            )
            for r in rows
        ]


async def disclosures(registry: Registry, code: str, resident_id: str, **params: str) -> httpx.Response:
    return await registry.client.get(
        f"/api/v1/municipalities/{code}/residents/{resident_id}/disclosures", params=params, headers=auth(code)
    )


def shown(response: httpx.Response) -> list[tuple[Any, ...]]:
    assert response.status_code == 200, response.text
    return [
        (d["direction"], d["municipality"], d["legal_basis"], d["doses"], d["request_id"])
        for d in response.json()["disclosures"]
    ]


async def test_a_lookup_logs_each_municipality_it_read_and_nothing_for_a_lookup_that_read_nothing(
    stack: Stack,
) -> None:
    registry = stack.registry
    await moved_to_chiyoda(stack)

    r = await lookup(registry, CHIYODA, MOVER, "my-number-act-19-16", request_id="single-1")
    assert r.status_code == 200 and len(r.json()["doses"]) == 2, r.text
    # Osaka showed no dose, and is logged all the same: its records of the person were read for Chiyoda.
    assert sorted(await logged(registry)) == [
        ("single-1", CHIYODA, "C1", SAPPORO, "S1", "my-number-act-19-16", 2),
        ("single-1", CHIYODA, "C1", OSAKA, "O1", "my-number-act-19-16", 0),
    ]

    # Registered elsewhere, nowhere, or asked by a municipality the person left: nothing read, nothing logged.
    for code, number in ((CHIYODA, STAYER), (CHIYODA, NOBODY), (SAPPORO, MOVER), (OSAKA, MOVER)):
        r = await lookup(registry, code, number, request_id="nothing")
        assert r.status_code == 200 and r.json() == {"doses": []}, r.text
    r = await batch(registry, [(STAYER, "consent"), (NOBODY, "my-number-act-19-16")], "nothing-batch")
    assert r.status_code == 200, r.text
    assert len(await logged(registry)) == 2

    # A batch: one row per item and municipality read, each with its item's own basis; the others none.
    items = [(MOVER, "consent"), (STAYER, "consent"), (NOBODY, "consent"), (MOVER, "my-number-act-19-16")]
    r = await batch(registry, items, "batch-1")
    assert r.status_code == 200, r.text
    assert [len(x["doses"]) for x in r.json()["results"]] == [2, 0, 0, 2]
    assert sorted((await logged(registry))[2:]) == [
        ("batch-1", CHIYODA, "C1", SAPPORO, "S1", "consent", 2),
        ("batch-1", CHIYODA, "C1", SAPPORO, "S1", "my-number-act-19-16", 2),
        ("batch-1", CHIYODA, "C1", OSAKA, "O1", "consent", 0),
        ("batch-1", CHIYODA, "C1", OSAKA, "O1", "my-number-act-19-16", 0),
    ]


async def test_the_log_holds_no_my_number_nor_its_hash(stack: Stack) -> None:
    registry = stack.registry
    await moved_to_chiyoda(stack)
    assert (await lookup(registry, CHIYODA, MOVER)).status_code == 200
    assert (await batch(registry, [(MOVER, "consent")], "b")).status_code == 200
    vault: MyNumberVault = registry.app.state.vault
    secrets = {MOVER, MOVER[-4:], vault.keyed_hash(MOVER).hex()}
    async with registry.databases.main.sessionmaker() as session:
        result = await session.execute(text("SELECT * FROM transfer_disclosures"))
        columns, rows = set(result.keys()), result.all()
    assert columns == {
        "id",
        "disclosed_at",
        "request_id",
        "caller_municipality",
        "caller_resident_id",
        "source_municipality",
        "source_resident_id",
        "legal_basis",
        "doses",
    }
    assert len(rows) == 4
    values = [value for row in rows for value in row]
    assert not any(isinstance(v, bytes | memoryview) for v in values)
    assert not any(secret in str(v) for v in values for secret in secrets)


async def test_a_lookup_that_fails_logs_nothing_and_one_that_cannot_log_fails(stack: Stack) -> None:
    registry = stack.registry
    await moved_to_chiyoda(stack)
    app = registry.app
    live = app.state.records
    app.state.records = InternalClient("http://127.0.0.1:9")  # nothing listens there
    try:
        r = await lookup(registry, CHIYODA, MOVER)
        assert r.status_code == 503, r.text
        r = await batch(registry, [(MOVER, "consent")], "b")
        assert r.status_code == 503, r.text
    finally:
        await app.state.records.close()
        app.state.records = live
    assert await logged(registry) == []

    # The log cannot be written: the lookup is refused, never answered unlogged.
    async with registry.databases.main.sessionmaker() as session, session.begin():
        await session.execute(text("DROP TABLE transfer_disclosures"))
    r = await lookup(registry, CHIYODA, MOVER)
    assert r.status_code >= 500 and "doses" not in r.text
    # A lookup that read nothing has nothing to log, and still answers.
    assert (await lookup(registry, CHIYODA, STAYER)).status_code == 200


async def test_both_municipalities_read_the_log_by_their_own_resident(stack: Stack) -> None:
    registry = stack.registry
    await moved_to_chiyoda(stack)
    assert (await lookup(registry, CHIYODA, MOVER, "my-number-act-19-16", request_id="first")).status_code == 200
    between = utcnow()
    assert (await batch(registry, [(MOVER, "consent"), (STAYER, "consent")], "second")).status_code == 200

    # Chiyoda received (newest first); Sapporo and Osaka provided, to Chiyoda.
    received = shown(await disclosures(registry, CHIYODA, "C1"))
    assert sorted(received[:2]) == [
        ("received", SAPPORO, "consent", 2, "second"),
        ("received", OSAKA, "consent", 0, "second"),
    ]
    assert sorted(received[2:]) == [
        ("received", SAPPORO, "my-number-act-19-16", 2, "first"),
        ("received", OSAKA, "my-number-act-19-16", 0, "first"),
    ]
    assert shown(await disclosures(registry, SAPPORO, "S1")) == [
        ("provided", CHIYODA, "consent", 2, "second"),
        ("provided", CHIYODA, "my-number-act-19-16", 2, "first"),
    ]
    assert shown(await disclosures(registry, OSAKA, "O1")) == [
        ("provided", CHIYODA, "consent", 0, "second"),
        ("provided", CHIYODA, "my-number-act-19-16", 0, "first"),
    ]
    assert shown(await disclosures(registry, SAPPORO, "S2")) == []  # looked up by Chiyoda, but never Chiyoda's
    # The other side's resident id is that municipality's own: never shown.
    answer = await disclosures(registry, SAPPORO, "S1")
    assert set(answer.json()) == {"disclosures", "truncated", "kept_from"} and answer.json()["truncated"] is False
    # Where the log's retention stands: rows from midnight in Japan starting this day seven years ago are kept.
    assert datetime.fromisoformat(answer.json()["kept_from"]) == kept_since(utcnow(), 7)
    assert set(answer.json()["disclosures"][0]) == {
        "at",
        "direction",
        "municipality",
        "legal_basis",
        "doses",
        "request_id",
    }
    assert "C1" not in answer.text and "S1" not in (await disclosures(registry, CHIYODA, "C1")).text

    # Another municipality's resident, on its own code or on the other's: the unknown-resident 404, byte for byte.
    unknown = await registry.client.get(f"/api/v1/municipalities/{CHIYODA}/residents/nobody", headers=auth(CHIYODA))
    assert unknown.status_code == 404
    for answer in (
        await disclosures(registry, CHIYODA, "nobody"),
        await disclosures(registry, CHIYODA, "S1"),
        await registry.client.get(f"/api/v1/municipalities/{SAPPORO}/residents/S1/disclosures", headers=auth(CHIYODA)),
    ):
        assert (answer.status_code, answer.content) == (404, unknown.content)

    # from/to: whole Japanese days (to inclusive) or moments.
    today = japan_today()
    assert len(shown(await disclosures(registry, CHIYODA, "C1", **{"from": str(today), "to": str(today)}))) == 4
    assert shown(await disclosures(registry, CHIYODA, "C1", to=str(today - timedelta(days=1)))) == []
    assert shown(await disclosures(registry, CHIYODA, "C1", **{"from": str(today + timedelta(days=1))})) == []
    since = {"from": between.isoformat()}
    assert [d[4] for d in shown(await disclosures(registry, CHIYODA, "C1", **since))] == ["second", "second"]
    assert [d[4] for d in shown(await disclosures(registry, SAPPORO, "S1", to=between.isoformat()))] == ["first"]
    # The same moment in Japan's time is the same moment.
    japan = {"from": between.astimezone(JAPAN).isoformat()}
    assert [d[4] for d in shown(await disclosures(registry, SAPPORO, "S1", **japan))] == ["second"]
    # ... and a moment without a zone is Japan's time.
    naive = {"from": between.astimezone(JAPAN).replace(tzinfo=None).isoformat()}
    assert [d[4] for d in shown(await disclosures(registry, SAPPORO, "S1", **naive))] == ["second"]
    for name, value in (("from", "yesterday"), ("to", "2026-02-30"), ("from", "2026-11-27T25:00")):
        bad = await disclosures(registry, CHIYODA, "C1", **{name: value})
        assert bad.status_code == 422, bad.text
        assert [e["field"] for e in bad.json()["errors"]] == [name]


async def whole_log(registry: Registry, code: str, token_of: str | None = None, **params: Any) -> httpx.Response:
    return await registry.client.get(
        f"/api/v1/municipalities/{code}/disclosures", params=params, headers=auth(token_of or code)
    )


def rows_of(response: httpx.Response) -> list[tuple[Any, ...]]:
    assert response.status_code == 200, response.text
    return [
        (d["direction"], d["resident_id"], d["municipality"], d["legal_basis"], d["doses"], d["request_id"])
        for d in response.json()["disclosures"]
    ]


async def test_a_municipality_reads_its_whole_log_for_a_period_a_page_at_a_time(stack: Stack) -> None:
    """What an audit of a municipality's My Number use reads: every lookup it made and every lookup of its records
    by another, newest first, each with its own resident's id and never the other's."""
    registry = stack.registry
    await moved_to_chiyoda(stack)
    assert (await lookup(registry, CHIYODA, MOVER, "my-number-act-19-16", request_id="first")).status_code == 200
    between = utcnow()
    assert (await batch(registry, [(MOVER, "consent"), (STAYER, "consent")], "second")).status_code == 200

    chiyoda = await whole_log(registry, CHIYODA)
    assert chiyoda.json()["more"] is False
    assert datetime.fromisoformat(chiyoda.json()["kept_from"]) == kept_since(utcnow(), 7)
    assert sorted(rows_of(chiyoda)[:2]) == [
        ("received", "C1", SAPPORO, "consent", 2, "second"),
        ("received", "C1", OSAKA, "consent", 0, "second"),
    ]
    assert sorted(rows_of(chiyoda)[2:]) == [
        ("received", "C1", SAPPORO, "my-number-act-19-16", 2, "first"),
        ("received", "C1", OSAKA, "my-number-act-19-16", 0, "first"),
    ]
    assert rows_of(await whole_log(registry, CHIYODA, direction="provided")) == []
    sapporo = await whole_log(registry, SAPPORO)
    assert rows_of(sapporo) == [
        ("provided", "S1", CHIYODA, "consent", 2, "second"),
        ("provided", "S1", CHIYODA, "my-number-act-19-16", 2, "first"),
    ]
    assert rows_of(await whole_log(registry, SAPPORO, direction="received")) == []
    assert "C1" not in sapporo.text and "O1" not in chiyoda.text and "S1" not in chiyoda.text
    assert [d[5] for d in rows_of(await whole_log(registry, OSAKA, **{"from": between.isoformat()}))] == ["second"]
    assert [d[5] for d in rows_of(await whole_log(registry, CHIYODA, to=between.isoformat()))] == ["first", "first"]

    # A page at a time, one row a page: the same rows in the same order, the two of one batch (the same moment)
    # included, and `more` false on the last page only.
    pages, before = [], None
    while True:
        page = await whole_log(registry, CHIYODA, limit="1", **({} if before is None else {"before_id": before}))
        pages.append(page)
        if not page.json()["more"]:
            break
        before = str(page.json()["disclosures"][-1]["id"])
    assert [row for page in pages for row in rows_of(page)] == rows_of(chiyoda)
    assert [len(rows_of(page)) for page in pages] == [1, 1, 1, 1]

    # A position in another municipality's log is refused, not used: it would tell when that one looked up.
    osaka_row = (await whole_log(registry, OSAKA)).json()["disclosures"][0]["id"]
    sapporo_only = next(d["id"] for d in chiyoda.json()["disclosures"] if d["municipality"] == SAPPORO)
    assert osaka_row != sapporo_only
    for code, before_id in ((OSAKA, sapporo_only), (OSAKA, 10**9)):
        bad = await whole_log(registry, code, before_id=str(before_id))
        assert bad.status_code == 422, bad.text
        assert [e["field"] for e in bad.json()["errors"]] == ["before_id"]
    for params in ({"direction": "both"}, {"limit": "0"}, {"limit": "1001"}, {"from": "yesterday"}):
        bad = await whole_log(registry, CHIYODA, **params)
        assert bad.status_code == 422, bad.text
        assert [e["field"] for e in bad.json()["errors"]] == list(params)
    # Another municipality's log: refused.
    assert (await whole_log(registry, CHIYODA, token_of=SAPPORO)).status_code == 403
