"""Move-out (転出) and move-in (転入), coupon lines and history, on PostgreSQL with two shards."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from services.registry.models import MyNumberDirectoryEntry
from shared.events import CouponEventType
from tests.integration.services.registry.registry_support import CHIYODA, SAPPORO, Registry, auth
from tests.integration.services.registry.test_registry_imports import my_number

PERSON = {"name": "山田 花子", "name_kana": "ヤマダ ハナコ", "birth_date": "1950-04-02", "sex": "F"}


async def put(registry: Registry, code: str, resident_id: str, **body: Any) -> Any:
    r = await registry.client.put(
        f"/api/v1/municipalities/{code}/residents/{resident_id}", json=PERSON | body, headers=auth(code)
    )
    assert r.status_code in (200, 201), r.text
    return r.json()


async def move(registry: Registry, code: str, resident_id: str, body: dict[str, Any], token_of: str = "") -> Any:
    return await registry.client.post(
        f"/api/v1/municipalities/{code}/residents/{resident_id}/move-out", json=body, headers=auth(token_of or code)
    )


async def test_move_out_ends_the_coupons_and_move_in_links_the_directory(registry: Registry) -> None:
    created = await put(registry, SAPPORO, "S1", my_number=my_number(7), coupon_number="0000000001")
    assert created["coupon_line"] == f"10{SAPPORO}0000000001"

    r = await move(registry, SAPPORO, "S1", {"moved_to": CHIYODA, "moved_on": "2021-08-31"})
    assert r.status_code == 200, r.text
    assert (r.json()["moved_to"], r.json()["moved_on"]) == (CHIYODA, "2021-08-31")
    again = await move(registry, SAPPORO, "S1", {"moved_to": CHIYODA, "moved_on": "2021-08-31"})
    assert again.status_code == 200

    events = await registry.events(SAPPORO)
    assert [(e.type, e.version) for e in events] == [(CouponEventType.ISSUED, 1), (CouponEventType.INVALIDATED, 2)]
    state = events[-1].state
    assert (str(state.invalid_from), state.invalid_reason, state.sex) == ("2021-08-31", "moved_out", "F")
    (resident,) = await registry.residents(SAPPORO)
    assert resident.version == 2  # the record is kept, only the move noted

    # A later PUT of the moved-out resident keeps the move and the ended coupon.
    await put(registry, SAPPORO, "S1", my_number=my_number(7), coupon_number="0000000001", address="札幌市")
    assert (await registry.events(SAPPORO))[-1].version == 2

    # 転入: the new municipality registers the same person with its own id and coupon.
    await put(registry, CHIYODA, "C77", my_number=my_number(7), coupon_number="0000000077")
    async with registry.databases.main.sessionmaker() as session:
        entries = (await session.execute(select(MyNumberDirectoryEntry))).scalars().all()
    assert sorted((e.municipality_code, e.resident_id) for e in entries) == [(SAPPORO, "S1"), (CHIYODA, "C77")]
    assert [e.coupon_number for e in await registry.events(CHIYODA)] == ["0000000077"]

    history = await registry.history("S1", SAPPORO)
    assert [h.version for h in history] == [1, 2, 3]
    assert history[1].changes == {
        "moved_to": {"before": None, "after": CHIYODA},
        "moved_on": {"before": None, "after": "2021-08-31"},
    }
    assert history[1].changed_by == f"municipality:{SAPPORO}"
    assert history[2].changes == {"address": {"before": None, "after": "札幌市"}}


async def test_move_out_refuses_bad_input_and_hides_other_municipalities(registry: Registry) -> None:
    await put(registry, SAPPORO, "S1", coupon_number="0000000001")
    bad = await move(registry, SAPPORO, "S1", {"moved_to": "131017", "moved_on": "2021-08-31"})
    assert bad.status_code == 422 and "moved_to" in bad.text
    same = await move(registry, SAPPORO, "S1", {"moved_to": SAPPORO, "moved_on": "2021-08-31"})
    assert same.status_code == 422 and same.json()["errors"][0]["field"] == "moved_to"
    future = await move(registry, SAPPORO, "S1", {"moved_to": CHIYODA, "moved_on": "2999-01-01"})
    assert future.status_code == 422 and "moved_on" in future.text
    unknown = await move(registry, SAPPORO, "S2", {"moved_to": CHIYODA, "moved_on": "2021-08-31"})
    foreign = await move(registry, SAPPORO, "S1", {"moved_to": CHIYODA, "moved_on": "2021-08-31"}, token_of=CHIYODA)
    assert unknown.status_code == foreign.status_code == 404 and unknown.json() == foreign.json()
    assert len(await registry.events(SAPPORO)) == 1


async def test_a_lost_coupon_is_reissued_once_and_auto_allocates_a_number(registry: Registry) -> None:
    created = await put(registry, CHIYODA, "A1", coupon_number="auto")
    first = created["coupon_number"]
    assert len(first) == 10 and first.isdigit() and created["coupon_line"] == f"10{CHIYODA}{first}"
    again = await put(registry, CHIYODA, "A1", coupon_number="auto")  # keeps the number it has
    assert again["coupon_number"] == first

    url = f"/api/v1/municipalities/{CHIYODA}/residents/A1/coupon-reissue"
    r = await registry.client.post(url, json={"replaces": first}, headers=auth(CHIYODA))
    assert r.status_code == 200, r.text
    second = r.json()["coupon_number"]
    assert second != first and len(second) == 10
    retry = await registry.client.post(url, json={"replaces": first}, headers=auth(CHIYODA))
    assert retry.status_code == 200 and retry.json()["coupon_number"] == second
    wrong = await registry.client.post(url, json={"replaces": "9999999999"}, headers=auth(CHIYODA))
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "replaces"

    latest = {e.coupon_number: e for e in await registry.events(CHIYODA)}
    assert latest[first].type is CouponEventType.INVALIDATED and latest[first].state.invalid_reason == "reissued"
    assert latest[second].type is CouponEventType.ISSUED and latest[second].version == 1
    assert len(await registry.events(CHIYODA)) == 3
    # The old number stays the resident's: nobody else can be given it.
    r = await registry.client.put(
        f"/api/v1/municipalities/{CHIYODA}/residents/A2", json=PERSON | {"coupon_number": first}, headers=auth(CHIYODA)
    )
    assert r.status_code == 409
    history = await registry.history("A1", CHIYODA)
    assert history[-1].changes == {"coupon_number": {"before": first, "after": second}}
