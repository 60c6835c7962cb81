"""Data flows one way through the bus: records answers without registry, and a resident registered while
records is down reaches records when it is back — on both stacks."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from devtools.launcher import Stack
from tests.e2e.test_walking_skeleton import (
    CHIYODA,
    CLINIC,
    MUNI,
    count_in,
    dose_body,
    new_coupon_number,
    wait_for_count,
    wait_until_records_knows,
)

CELL = "date,municipality,sex,age_band"


@pytest.fixture
async def gw(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url(), timeout=30) as client:
        yield client


async def register(gw: httpx.AsyncClient, coupon: str, *, birth_date: str = "1950-04-02", sex: str = "F") -> None:
    body = {
        "name": "佐藤 花子",
        "name_kana": "サトウ ハナコ",
        "birth_date": birth_date,
        "sex": sex,
        "coupon_number": coupon,
    }
    r = await gw.put(f"/api/v1/municipalities/{CHIYODA}/residents/r-{coupon}", json=body, headers=MUNI)
    assert r.status_code == 201, r.text


async def post_dose(
    gw: httpx.AsyncClient, coupon: str, *, dose_number: int = 1, on: str = "2021-06-01"
) -> httpx.Response:
    body = dose_body(coupon, dose_number=dose_number, on=on)
    return await gw.post("/api/v1/doses", json=body, headers={**CLINIC, "Idempotency-Key": f"{coupon}-{dose_number}"})


async def test_doses_are_recorded_in_their_cells_while_registry_is_stopped(stack: Stack, gw: httpx.AsyncClient) -> None:
    coupons = [new_coupon_number() for _ in range(3)]
    day1, day2 = "2021-10-04", "2021-10-25"
    female_65 = {"date": day1, "municipality": CHIYODA, "sex": "F", "age_band": "65-"}
    before = await count_in(gw, group_by=CELL, match=female_65)
    for coupon in coupons:
        await register(gw, coupon)
    for coupon in coupons:
        await wait_until_records_knows(gw, coupon)
        r = await post_dose(gw, coupon, on=day1)
        assert (r.status_code, r.json()["status"]) == (201, "recorded")
    await wait_for_count(gw, before + 3, group_by=CELL, match=female_65)

    second = {**female_65, "date": day2}
    before_second = await count_in(gw, group_by=CELL, match=second)
    stack.processes["registry"].send_signal(signal.SIGSTOP)
    try:
        for coupon in coupons:
            started = time.monotonic()
            r = await post_dose(gw, coupon, dose_number=2, on=day2)
            elapsed = time.monotonic() - started
            assert r.status_code == 201, r.text
            assert r.json()["status"] == "recorded"
            assert elapsed < 0.5, f"a dose took {elapsed:.2f}s with registry stopped"
        await wait_for_count(gw, before_second + 3, group_by=CELL, match=second)
    finally:
        stack.processes["registry"].send_signal(signal.SIGCONT)


async def test_a_resident_registered_while_records_is_down_is_matched_when_it_is_back(
    stack: Stack, gw: httpx.AsyncClient
) -> None:
    coupon, day = new_coupon_number(), "2021-10-11"
    unknown = {"date": day, "municipality": CHIYODA, "sex": "U", "age_band": "UNK"}
    female_65 = {**unknown, "sex": "F", "age_band": "65-"}
    unknown_before = await count_in(gw, group_by=CELL, match=unknown)
    female_before = await count_in(gw, group_by=CELL, match=female_65)
    r = await post_dose(gw, coupon, on=day)
    assert (r.status_code, r.json()["status"]) == (201, "unmatched")
    await wait_for_count(gw, unknown_before + 1, group_by=CELL, match=unknown)

    stack.stop_service("records")
    try:
        await register(gw, coupon)  # registry answers; its coupon event waits on the bus
    finally:
        stack.start_service("records")
        stack.wait_healthy("records", timeout=60)

    await wait_for_count(gw, female_before + 1, group_by=CELL, match=female_65)
    await wait_for_count(gw, unknown_before, group_by=CELL, match=unknown)
    resident = await gw.get(f"/api/v1/municipalities/{CHIYODA}/residents/r-{coupon}", headers=MUNI)
    assert resident.status_code == 200
    assert [d["status"] for d in resident.json()["doses"]] == ["recorded"]
