"""Through the gateway, on both stacks: a municipality imports its residents from a 住基 CSV, one of them
moves, and the new municipality looks up the doses recorded before the move."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from devtools.launcher import Stack
from shared.domain.codes import my_number_check_digit
from tests.e2e.test_walking_skeleton import CHIYODA, CLINIC, MUNI, OTHER_MUNI, SAPPORO, dose_body, new_coupon_number


@pytest.fixture
async def gw(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url(), timeout=30) as client:
        yield client


def new_my_number() -> str:
    first = f"{secrets.randbelow(10**11):011d}"
    return first + str(my_number_check_digit(first))


async def imported(gw: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
    base = f"/api/v1/municipalities/{SAPPORO}/resident-imports"
    r = await gw.post(base, content=data, headers=OTHER_MUNI | {"Content-Type": "text/csv"})
    assert r.status_code == 202, r.text
    import_id = r.json()["import_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = await gw.get(f"{base}/{import_id}", headers=OTHER_MUNI)
        assert status.status_code == 200, status.text
        body: dict[str, Any] = status.json()
        if body["status"] == "done":
            return body | {"import_id": import_id}
        await asyncio.sleep(0.2)
    raise AssertionError("the import did not finish in 60 s")


async def test_import_move_and_transfer_lookup(stack: Stack, gw: httpx.AsyncClient) -> None:
    tag = uuid.uuid4().hex[:8]
    mover, stayer = new_my_number(), new_my_number()
    coupon = new_coupon_number()
    rows = [
        "個別宛名番号,氏名,氏名カナ,生年月日,性別,個人番号,住所,券番号",
        f"{tag}-1,札幌 花子,サッポロ ハナコ,19500402,2,{mover},札幌市中央区,{coupon}",
        f"{tag}-2,札幌 太郎,サッポロ タロウ,1951/01/01,1,{stayer},札幌市中央区,",
        f"{tag}-3,,サッポロ,19500402,2,,,",
    ]
    data = "\r\n".join(rows).encode("cp932") + b"\r\n"
    status = await imported(gw, data)
    assert (status["rows_total"], status["rows_ok"], status["rows_failed"]) == (3, 2, 1)
    assert [(e["row"], e["field"]) for e in status["errors"]] == [(4, "name")]
    again = await gw.post(
        f"/api/v1/municipalities/{SAPPORO}/resident-imports",
        content=data,
        headers=OTHER_MUNI | {"Content-Type": "text/csv"},
    )
    assert again.json()["import_id"] == status["import_id"]
    # Another municipality cannot read the import.
    peek = await gw.get(f"/api/v1/municipalities/{SAPPORO}/resident-imports/{status['import_id']}", headers=MUNI)
    assert peek.status_code == 403

    r = await gw.post(
        "/api/v1/doses", json=dose_body(coupon, municipality=SAPPORO), headers=CLINIC | {"Idempotency-Key": f"{tag}-d1"}
    )
    assert r.status_code == 201, r.text
    r = await gw.post(
        f"/api/v1/municipalities/{SAPPORO}/residents/{tag}-1/move-out",
        json={"moved_to": CHIYODA, "moved_on": "2021-08-31"},
        headers=OTHER_MUNI,
    )
    assert r.status_code == 200, r.text
    person = {"name": "札幌 花子", "name_kana": "サッポロ ハナコ", "birth_date": "1950-04-02", "sex": "F"}
    r = await gw.put(
        f"/api/v1/municipalities/{CHIYODA}/residents/{tag}-c", json=person | {"my_number": mover}, headers=MUNI
    )
    assert r.status_code == 201, r.text

    lookup = f"/api/v1/municipalities/{CHIYODA}/transfer-lookups"
    r = await gw.post(lookup, json={"my_number": mover, "legal_basis": "consent"}, headers=MUNI)
    assert r.status_code == 200, r.text
    single_request = r.headers["x-request-id"]  # the gateway's: the id of its audit entry
    assert r.json()["doses"] == [
        {
            "municipality": SAPPORO,
            "dose_number": 1,
            "vaccinated_on": "2021-06-01",
            "vaccine": "pfizer",
            "lot_number": "EY0583",
        }
    ]
    for number in (stayer, new_my_number()):  # lives elsewhere, or nobody: the same empty answer
        r = await gw.post(lookup, json={"my_number": number, "legal_basis": "consent"}, headers=MUNI)
        assert r.status_code == 200 and r.json() == {"doses": []}
    r = await gw.post(lookup, json={"my_number": mover, "legal_basis": "because"}, headers=MUNI)
    assert r.status_code == 422

    # The contract's batch: a legal basis per item, mixed, and no header; the gateway tells registry the bases.
    batch = {
        "lookups": [
            {"client_id": "x", "my_number": mover, "legal_basis": "my-number-act-19-16"},
            {"client_id": "y", "my_number": stayer, "legal_basis": "consent"},
        ]
    }
    for extra in ({}, {"X-Access-Purpose": "administration"}):  # a header the client sends changes nothing
        r = await gw.post(f"{lookup}/batch", json=batch, headers=MUNI | extra)
        assert r.status_code == 200, r.text
        assert [(x["client_id"], len(x["doses"])) for x in r.json()["results"]] == [("x", 1), ("y", 0)]
    batch["lookups"][1]["legal_basis"] = "because"
    r = await gw.post(f"{lookup}/batch", json=batch, headers=MUNI)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "lookups[1].legal_basis"

    # The disclosure log (情報提供等記録): each lookup that read Sapporo's records of the mover, newest first, seen
    # by both; lookups that read nothing (the stayer, nobody) and the refused batch left nothing.
    def log_of(code: str, resident_id: str) -> str:
        return f"/api/v1/municipalities/{code}/residents/{resident_id}/disclosures"

    r = await gw.get(log_of(CHIYODA, f"{tag}-c"), headers=MUNI)
    assert r.status_code == 200, r.text
    received = r.json()["disclosures"]
    assert [(d["direction"], d["municipality"], d["legal_basis"], d["doses"]) for d in received] == [
        ("received", SAPPORO, "my-number-act-19-16", 1),
        ("received", SAPPORO, "my-number-act-19-16", 1),
        ("received", SAPPORO, "consent", 1),
    ]
    assert received[-1]["request_id"] == single_request
    r = await gw.get(log_of(SAPPORO, f"{tag}-1"), headers=OTHER_MUNI)
    assert r.status_code == 200, r.text
    provided = r.json()["disclosures"]
    assert [(d["direction"], d["municipality"], d["request_id"]) for d in provided] == [
        ("provided", CHIYODA, d["request_id"]) for d in received
    ]
    assert f"{tag}-c" not in r.text  # Chiyoda's own resident id is not Sapporo's to see
    r = await gw.get(log_of(SAPPORO, f"{tag}-2"), headers=OTHER_MUNI)
    assert r.status_code == 200 and r.json()["disclosures"] == []
    r = await gw.get(log_of(SAPPORO, f"{tag}-1"), headers=MUNI)  # another municipality's resident
    assert r.status_code == 404

    # Each municipality's whole log (an audit of its My Number use) holds the same rows, each with its own
    # resident's id only; another municipality's whole log is refused.
    lookups = {d["request_id"] for d in received}

    async def whole_log(code: str, token: dict[str, str]) -> list[dict[str, Any]]:
        r = await gw.get(f"/api/v1/municipalities/{code}/disclosures", headers=token)
        assert r.status_code == 200, r.text
        return [d for d in r.json()["disclosures"] if d["request_id"] in lookups]

    assert [(d["direction"], d["resident_id"], d["municipality"]) for d in await whole_log(CHIYODA, MUNI)] == [
        ("received", f"{tag}-c", SAPPORO)
    ] * len(received)
    assert [(d["direction"], d["resident_id"], d["municipality"]) for d in await whole_log(SAPPORO, OTHER_MUNI)] == [
        ("provided", f"{tag}-1", CHIYODA)
    ] * len(received)
    r = await gw.get(f"/api/v1/municipalities/{SAPPORO}/disclosures", headers=MUNI)
    assert r.status_code == 403
