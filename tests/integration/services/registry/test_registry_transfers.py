"""Transfer lookups on PostgreSQL with two shards: registry (directory, coupons, signed grants) and records
(doses) served for real, records over HTTP as in production."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import date
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.records.service import Submission
from shared.grants import DEV_PRIVATE_KEY, TransferGrant, sign_grant
from tests.integration.services.records.records_support import dose, recorder, records_databases
from tests.integration.services.registry.registry_support import (
    CHIYODA,
    SAPPORO,
    Registry,
    auth,
    migrated_registry,
    records_over_http,
    serve,
)
from tests.integration.services.registry.test_registry_imports import my_number

OSAKA = "271004"
PERSON = {"name": "山田 花子", "name_kana": "ヤマダ ハナコ", "birth_date": "1950-04-02", "sex": "F"}


@pytest.fixture
async def stack(make_database: Callable[..., str]) -> AsyncIterator[tuple[Registry, Any]]:
    async for records_dbs in records_databases(make_database):
        async with records_over_http(records_dbs) as url:
            settings = await migrated_registry(make_database, records_url=url)
            async for registry in serve(settings):
                yield registry, recorder(records_dbs)


async def put(registry: Registry, code: str, resident_id: str, **body: Any) -> None:
    r = await registry.client.put(
        f"/api/v1/municipalities/{code}/residents/{resident_id}", json=PERSON | body, headers=auth(code)
    )
    assert r.status_code in (200, 201), r.text


async def lookup(registry: Registry, code: str, number: str, basis: str = "consent") -> Any:
    return await registry.client.post(
        f"/api/v1/municipalities/{code}/transfer-lookups",
        json={"my_number": number, "legal_basis": basis},
        headers=auth(code),
    )


async def test_the_new_municipality_sees_earlier_doses_and_nobody_else_does(stack: tuple[Registry, Any]) -> None:
    registry, record = stack
    moved, stayed = my_number(41), my_number(42)
    # Lived in Sapporo (shard s1) with two doses, moved to Chiyoda (shard s0).
    await put(registry, SAPPORO, "S1", my_number=moved, coupon_number="0000000001")
    await put(registry, SAPPORO, "S2", my_number=stayed, coupon_number="0000000002")
    town = {"municipality": SAPPORO}
    await record(
        Submission("k1", dose("0000000001", **town)),
        Submission("k2", dose("0000000001", dose_number=2, vaccinated_on=date(2021, 6, 22), **town)),
        Submission("k3", dose("0000000002", **town)),
    )
    r = await registry.client.post(
        f"/api/v1/municipalities/{SAPPORO}/residents/S1/move-out",
        json={"moved_to": CHIYODA, "moved_on": "2021-08-31"},
        headers=auth(SAPPORO),
    )
    assert r.status_code == 200
    await put(registry, CHIYODA, "C1", my_number=moved, coupon_number="0000000077")

    r = await lookup(registry, CHIYODA, moved, "my-number-act-19-16")
    assert r.status_code == 200, r.text
    assert r.json()["doses"] == [
        {
            "municipality": SAPPORO,
            "dose_number": 1,
            "vaccinated_on": "2021-06-01",
            "vaccine": "pfizer",
            "lot_number": "EY0583",
        },
        {
            "municipality": SAPPORO,
            "dose_number": 2,
            "vaccinated_on": "2021-06-22",
            "vaccine": "pfizer",
            "lot_number": "EY0583",
        },
    ]
    # Not registered in Chiyoda (stayed in Sapporo), unknown, or asked by the old municipality after the move:
    # the same answer as an unknown number.
    nobody = [await lookup(registry, CHIYODA, n) for n in (stayed, my_number(99))]
    old_town = await lookup(registry, SAPPORO, moved)
    for answer in (*nobody, old_town):
        assert answer.status_code == 200 and answer.json() == {"doses": []}

    bad_basis = await lookup(registry, CHIYODA, moved, "curiosity")
    assert bad_basis.status_code == 422 and "legal_basis" in bad_basis.text
    stranger = await registry.client.post(
        f"/api/v1/municipalities/{CHIYODA}/transfer-lookups",
        json={"my_number": moved, "legal_basis": "consent"},
        headers=auth(OSAKA),
    )
    assert stranger.status_code == 404

    # The batch: same answers, in order, and the audit header must name the legal bases used.
    items = [
        {"client_id": "a", "my_number": moved, "legal_basis": "consent"},
        {"client_id": "b", "my_number": stayed, "legal_basis": "consent"},
        {"client_id": "c", "my_number": my_number(99), "legal_basis": "my-number-act-19-16"},
    ]
    url = f"/api/v1/municipalities/{CHIYODA}/transfer-lookups/batch"
    missing = await registry.client.post(url, json={"lookups": items}, headers=auth(CHIYODA))
    assert missing.status_code == 422 and "X-Access-Purpose" in missing.text
    r = await registry.client.post(
        url,
        json={"lookups": items},
        headers=auth(CHIYODA) | {"X-Access-Purpose": "consent,my-number-act-19-16"},
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["client_id"] for x in results] == ["a", "b", "c"]
    assert [len(x["doses"]) for x in results] == [2, 0, 0]


async def test_records_shows_transfer_doses_only_to_the_caller_a_registry_grant_names(
    stack: tuple[Registry, Any],
) -> None:
    registry, record = stack
    await record(Submission("k1", dose("0000000001", municipality=SAPPORO)))
    records = httpx.AsyncClient(base_url=registry.settings.records_url)
    grant = TransferGrant(caller=CHIYODA, legal_basis=["consent"], municipality=SAPPORO, coupons=["0000000001"])
    token = sign_grant(DEV_PRIVATE_KEY, grant)
    path = "/internal/v1/transfer-doses"
    r = await records.post(path, json={"grants": [token]}, headers=auth(CHIYODA))
    status, body = r.status_code, r.json()
    assert status == 200 and len(body["doses"]) == 1
    # The same grant in another municipality's hands, or a grant signed by anyone but registry: refused.
    r = await records.post(path, json={"grants": [token]}, headers=auth(OSAKA))
    status, _ = r.status_code, r.json()
    assert status == 403
    forged_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    forged = sign_grant(forged_key.decode(), grant)
    r = await records.post(path, json={"grants": [forged]}, headers=auth(CHIYODA))
    status, _ = r.status_code, r.json()
    assert status == 403
    # Without a grant, the caller's token reads only its own municipality.
    r = await records.get(
        f"/internal/v1/municipalities/{SAPPORO}/doses", params={"coupon_number": "0000000001"}, headers=auth(CHIYODA)
    )
    status = r.status_code
    assert status == 403
    await records.aclose()
