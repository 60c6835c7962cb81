"""A dose travels from a tablet's request to the statistics, through the gateway, on both stacks."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from devtools.launcher import Stack
from devtools.tokens import bearer_headers
from shared.auth import Role

CHIYODA, SAPPORO = "131016", "011002"
INSTITUTION = "1312345678"
_serial = itertools.count(1)


def bearer(**claims: Any) -> dict[str, str]:
    return bearer_headers(**claims)


MUNI = bearer(role=Role.MUNICIPALITY, municipality=CHIYODA)
OTHER_MUNI = bearer(role=Role.MUNICIPALITY, municipality=SAPPORO)
CLINIC = bearer(role=Role.INSTITUTION, institution=INSTITUTION)
NATIONAL = bearer(role=Role.NATIONAL)


def new_coupon_number() -> str:
    # Unique per test run so that both stacks and reruns never collide.
    return f"{(uuid.uuid4().int % 10**9):09d}{next(_serial) % 10}"


@pytest.fixture
async def gw(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url(), timeout=30) as client:
        yield client


async def count_in(
    gw: httpx.AsyncClient, *, group_by: str, match: dict[str, Any], params: dict[str, str] | None = None
) -> int:
    r = await gw.get("/api/v1/stats/doses", params={"group_by": group_by, **(params or {})}, headers=NATIONAL)
    assert r.status_code == 200, r.text
    return sum(row["count"] for row in r.json()["rows"] if all(row.get(k) == v for k, v in match.items()))


async def wait_for_count(gw: httpx.AsyncClient, expected: int, timeout: float = 30, **kw: Any) -> None:
    deadline = time.monotonic() + timeout
    while (got := await count_in(gw, **kw)) != expected:
        assert time.monotonic() < deadline, f"stats show {got}, expected {expected} ({kw})"
        await asyncio.sleep(0.05)


async def wait_until_records_knows(
    gw: httpx.AsyncClient, coupon_number: str, *, municipality: str = CHIYODA, timeout: float = 30
) -> None:
    """A registered resident reaches records through ``coupon-events``: wait until records can match them."""
    line = f"10{municipality}{coupon_number}"
    deadline = time.monotonic() + timeout
    while True:
        r = await gw.get(f"/api/v1/coupons/{line}", headers=CLINIC)
        assert r.status_code == 200, r.text
        if r.json()["registered"]:
            return
        assert time.monotonic() < deadline, f"records never learned of coupon {coupon_number}"
        await asyncio.sleep(0.02)


def dose_body(
    coupon_number: str, *, dose_number: int = 1, on: str = "2021-06-01", municipality: str = CHIYODA
) -> dict[str, Any]:
    return {
        "coupon": f"1{dose_number}{municipality}{coupon_number}",
        "dose_number": dose_number,
        "vaccinated_on": on,
        "vaccine": "pfizer",
        "lot_number": "EY0583",
        "venue": "千代田区役所",
    }


async def test_resident_dose_stats_path(gw: httpx.AsyncClient) -> None:
    coupon = new_coupon_number()
    resident_id = f"r-{coupon}"
    resident = {
        "name": "山田 花子",
        "name_kana": "ヤマダ ハナコ",
        "birth_date": "1950-04-02",
        "sex": "F",
        "my_number": "123456789018",
        "coupon_number": coupon,
    }
    path = f"/api/v1/municipalities/{CHIYODA}/residents/{resident_id}"
    r = await gw.put(path, json=resident, headers=MUNI)
    assert r.status_code == 201, r.text
    assert r.json()["my_number"] == "********9018"
    assert "123456789018" not in r.text
    r = await gw.put(path, json=resident, headers=MUNI)
    assert r.status_code == 200
    await wait_until_records_knows(gw, coupon)

    day = "2021-06-03"
    before = await count_in(gw, group_by="date,prefecture", match={"date": day, "prefecture": "13"})
    key = str(uuid.uuid4())
    r = await gw.post("/api/v1/doses", json=dose_body(coupon, on=day), headers={**CLINIC, "Idempotency-Key": key})
    assert r.status_code == 201, r.text
    accepted = r.json()
    assert accepted["status"] == "recorded" and accepted["findings"] == []
    again = await gw.post("/api/v1/doses", json=dose_body(coupon, on=day), headers={**CLINIC, "Idempotency-Key": key})
    assert again.status_code == 201 and again.json() == accepted

    await wait_for_count(gw, before + 1, group_by="date,prefecture", match={"date": day, "prefecture": "13"})
    # The cell carries the resident's attributes: 71 on the day (in the seventies), female, dose 1.
    cell = {
        "date": day,
        "sex": "F",
        "age_band": "65-",
        "age_band_10": "70-79",
        "dose_number": 1,
        "municipality": CHIYODA,
    }
    assert await count_in(gw, group_by="date,municipality,sex,age_band,age_band_10,dose_number", match=cell) >= 1

    r = await gw.get(path, headers=MUNI)
    assert r.status_code == 200
    assert [d["dose_id"] for d in r.json()["doses"]] == [accepted["dose_id"]]

    # The public sees the same count without a token; the retried request did not double it.
    r = await gw.get("/api/v1/stats/doses", params={"group_by": "date,prefecture", "from": day, "to": day})
    assert r.status_code == 200
    assert {"date": day, "prefecture": "13", "count": before + 1} in r.json()["rows"]


async def test_unmatched_dose_moves_to_its_cell_when_resident_registers(gw: httpx.AsyncClient) -> None:
    coupon = new_coupon_number()
    day = "2021-06-04"
    unknown = {"date": day, "municipality": CHIYODA, "sex": "U", "age_band": "UNK"}
    known = {"date": day, "municipality": CHIYODA, "sex": "M", "age_band": "-64"}
    g = "date,municipality,sex,age_band"
    u0, k0 = await count_in(gw, group_by=g, match=unknown), await count_in(gw, group_by=g, match=known)

    r = await gw.post("/api/v1/doses", json=dose_body(coupon, on=day), headers={**CLINIC, "Idempotency-Key": coupon})
    assert r.status_code == 201 and r.json()["status"] == "unmatched"
    await wait_for_count(gw, u0 + 1, group_by=g, match=unknown)

    resident = {
        "name": "鈴木 一郎",
        "name_kana": "スズキ イチロウ",
        "birth_date": "1980-01-01",
        "sex": "M",
        "coupon_number": coupon,
    }
    r = await gw.put(f"/api/v1/municipalities/{CHIYODA}/residents/r-{coupon}", json=resident, headers=MUNI)
    assert r.status_code == 201
    await wait_for_count(gw, k0 + 1, group_by=g, match=known)
    await wait_for_count(gw, u0, group_by=g, match=unknown)


async def test_other_municipality_sees_not_found(gw: httpx.AsyncClient) -> None:
    coupon = new_coupon_number()
    resident = {"name": "田中 太郎", "name_kana": "タナカ タロウ", "sex": "M", "coupon_number": coupon}
    path = f"/api/v1/municipalities/{CHIYODA}/residents/r-{coupon}"
    assert (await gw.put(path, json=resident, headers=MUNI)).status_code == 201
    foreign = await gw.get(path, headers=OTHER_MUNI)
    missing = await gw.get(f"/api/v1/municipalities/{SAPPORO}/residents/no-such-person", headers=OTHER_MUNI)
    assert foreign.status_code == missing.status_code == 404
    assert foreign.content == missing.content
    assert (await gw.get(path)).status_code == 401
    assert (await gw.get(path, headers=CLINIC)).status_code == 403


async def test_bad_input_is_named(gw: httpx.AsyncClient) -> None:
    coupon = new_coupon_number()
    bad = dose_body(coupon) | {"coupon": f"11131017{coupon}"}  # check digit of 13101 is 6
    r = await gw.post("/api/v1/doses", json=bad, headers={**CLINIC, "Idempotency-Key": str(uuid.uuid4())})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "coupon"
    future = dose_body(coupon, on="2099-01-01")
    r = await gw.post("/api/v1/doses", json=future, headers={**CLINIC, "Idempotency-Key": str(uuid.uuid4())})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "vaccinated_on"
    r = await gw.post("/api/v1/doses", json=dose_body(coupon), headers=CLINIC)
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["detail"]
    r = await gw.put(
        f"/api/v1/municipalities/{CHIYODA}/residents/x-{coupon}",
        json={"name": "x", "name_kana": "x", "sex": "F", "my_number": "123456789012"},
        headers=MUNI,
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "my_number"
    assert "123456789012" not in r.text


async def test_batch_is_idempotent_per_item(gw: httpx.AsyncClient) -> None:
    a, b = new_coupon_number(), new_coupon_number()
    day = "2021-06-05"
    batch = {
        "doses": [
            {"client_id": f"c-{a}-1", **dose_body(a, on=day)},
            {"client_id": f"c-{b}-1", **dose_body(b, on=day)},
            {"client_id": f"c-{b}-x", **dose_body(b, on="2099-01-01")},
        ]
    }
    before = await count_in(gw, group_by="date", match={"date": day})
    r = await gw.post("/api/v1/doses/batch", json=batch, headers=CLINIC)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["unmatched", "unmatched", "rejected"]
    assert results[2]["error"]["errors"][0]["field"] == "vaccinated_on"
    again = await gw.post("/api/v1/doses/batch", json=batch, headers=CLINIC)
    assert again.json() == r.json()
    await wait_for_count(gw, before + 2, group_by="date", match={"date": day})
    await asyncio.sleep(0.5)
    assert await count_in(gw, group_by="date", match={"date": day}) == before + 2


async def test_review_correction_and_void_move_statistics_exactly(gw: httpx.AsyncClient) -> None:
    coupon = new_coupon_number()
    resident = {
        "name": "高橋 陽子",
        "name_kana": "タカハシ ヨウコ",
        "birth_date": "1990-05-05",
        "sex": "F",
        "coupon_number": coupon,
    }
    r = await gw.put(f"/api/v1/municipalities/{CHIYODA}/residents/r-{coupon}", json=resident, headers=MUNI)
    assert r.status_code == 201
    await wait_until_records_knows(gw, coupon)
    d1, d2, moved = "2021-06-10", "2021-06-20", "2021-07-02"
    g = "date,municipality,dose_number"
    cells = {day: {"date": day, "municipality": CHIYODA, "dose_number": 2} for day in (d2, moved)}
    base = {day: await count_in(gw, group_by=g, match=cell) for day, cell in cells.items()}

    headers = {**CLINIC, "Idempotency-Key": f"{coupon}-1"}
    assert (await gw.post("/api/v1/doses", json=dose_body(coupon, on=d1), headers=headers)).json()[
        "status"
    ] == "recorded"
    # Dose 2 of Pfizer after 10 days breaks the interval rule in force: kept, but sent to review.
    headers = {**CLINIC, "Idempotency-Key": f"{coupon}-2"}
    r = await gw.post("/api/v1/doses", json=dose_body(coupon, dose_number=2, on=d2), headers=headers)
    second = r.json()
    assert second["status"] == "needs_review"
    assert [f["code"] for f in second["findings"]] == ["interval_too_short"]
    await wait_for_count(gw, base[d2] + 1, group_by=g, match=cells[d2])

    queue = await gw.get(f"/api/v1/municipalities/{CHIYODA}/doses", params={"status": "needs_review"}, headers=MUNI)
    assert second["dose_id"] in [d["dose_id"] for d in queue.json()["doses"]]
    foreign = await gw.get(f"/api/v1/municipalities/{CHIYODA}/doses", headers=OTHER_MUNI)
    assert foreign.status_code == 403

    corrections = f"/api/v1/municipalities/{CHIYODA}/doses/{second['dose_id']}/corrections"
    r = await gw.post(corrections, json={"changes": {"vaccinated_on": moved}, "reason": "date misread"}, headers=MUNI)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "recorded" and r.json()["vaccinated_on"] == moved
    await wait_for_count(gw, base[moved] + 1, group_by=g, match=cells[moved])
    await wait_for_count(gw, base[d2], group_by=g, match=cells[d2])

    r = await gw.post(corrections, json={"void": True, "reason": "recorded for the wrong person"}, headers=MUNI)
    assert r.status_code == 200 and r.json()["voided"] is True
    await wait_for_count(gw, base[moved], group_by=g, match=cells[moved])
    r = await gw.post(corrections, json={"changes": {"lot_number": "X"}, "reason": "again"}, headers=MUNI)
    assert r.status_code == 409


async def test_concurrent_retries_record_one_dose(gw: httpx.AsyncClient) -> None:
    coupon = new_coupon_number()
    day = "2021-06-06"
    before = await count_in(gw, group_by="date", match={"date": day})
    headers = {**CLINIC, "Idempotency-Key": f"tablet-retry-{coupon}"}
    answers = await asyncio.gather(
        *(gw.post("/api/v1/doses", json=dose_body(coupon, on=day), headers=headers) for _ in range(12))
    )
    assert {r.status_code for r in answers} == {201}, [r.text for r in answers if r.status_code != 201]
    assert len({r.json()["dose_id"] for r in answers}) == 1
    await wait_for_count(gw, before + 1, group_by="date", match={"date": day})
    await asyncio.sleep(0.5)
    assert await count_in(gw, group_by="date", match={"date": day}) == before + 1


def test_a_direct_call_to_a_service_port_is_refused(stack: Stack) -> None:
    """Only the gateway's internal token opens a service: a caller's own token, or none, gets 401 everywhere."""
    paths = {
        "registry": f"/api/v1/municipalities/{CHIYODA}/residents/anyone",
        "records": f"/api/v1/municipalities/{CHIYODA}/doses",
        "stats": "/api/v1/stats/doses",
    }
    for service, path in paths.items():
        for headers in ({}, MUNI, NATIONAL):
            response = httpx.get(stack.url(service) + path, headers=headers)
            assert response.status_code == 401, (service, headers, response.text)
        assert httpx.get(stack.url(service) + "/healthz").status_code == 200
