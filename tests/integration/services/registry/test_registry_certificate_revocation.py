"""Revocation at the speed of records: a card whose dose is voided or corrected in records is revoked at the
next verification by anyone (no login), or by the background sweep, with no municipality read in between.

registry and records are served for real — records over HTTP as in production — on SQLite (the embedded
stack) and on PostgreSQL with two shards. Doses are voided and corrected through records' own corrections
endpoint; registry learns of it only by asking records under a dose-version grant.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.records.service import Submission, apply_coupon_events
from services.registry import certificates
from services.registry.models import IssuedCertificate
from shared.auth import Role
from shared.db import Databases, utcnow
from shared.errors import ServiceUnavailable
from shared.grants import DEV_PRIVATE_KEY, CertifiedDoses, DoseVersionGrant, TransferGrant, sign_grant
from shared.internal import InternalClient
from tests.factories import internal_headers
from tests.integration.services.records.records_support import dose, recorder, records_databases
from tests.integration.services.registry.registry_support import (
    CHIYODA,
    Registry,
    auth,
    database_maker,
    migrated_registry,
    records_over_http,
    serve,
)

PERSON = {"name": "山田 花子", "name_kana": "ヤマダ ハナコ", "birth_date": "1950-04-02", "sex": "F"}
ANYONE = internal_headers(Role.ANONYMOUS)


class CountingClient(InternalClient):
    """records as registry reaches it, counting the calls a sweep makes."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.calls: list[str] = []

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        self.calls.append(path)
        return await super().request(method, path, **kwargs)


@dataclass
class Stack:
    registry: Registry
    records_db: Databases
    records: httpx.AsyncClient  # records' HTTP surface, as the gateway and registry reach it
    record: Callable[..., Any]

    @property
    def issuer(self) -> certificates.Issuer:
        issuer: certificates.Issuer = self.registry.app.state.issuer
        return issuer


@pytest.fixture(params=["sqlite", "postgresql"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    make_database = database_maker(request, tmp_path)
    async for records_dbs in records_databases(make_database):
        async with records_over_http(records_dbs) as url:
            # The background sweep is off: the tests drive its passes, so nothing depends on timing.
            settings = await migrated_registry(make_database, records_url=url, certificate_sweep_seconds=0)
            async for registry in serve(settings):
                async with httpx.AsyncClient(base_url=url) as records:
                    yield Stack(registry, records_dbs, records, recorder(records_dbs))


async def resident_with_doses(stack: Stack, resident_id: str, coupon: str, doses: int) -> list[str]:
    """A Chiyoda resident, known to records through registry's coupon events, with ``doses`` doses recorded."""
    r = await stack.registry.client.put(
        f"/api/v1/municipalities/{CHIYODA}/residents/{resident_id}",
        json=PERSON | {"coupon_number": coupon},
        headers=auth(),
    )
    assert r.status_code == 201, r.text
    async with stack.records_db.shards["s0"].sessionmaker() as session, session.begin():
        await apply_coupon_events(session, await stack.registry.events())
    outcomes = await stack.record(
        *(
            Submission(
                f"{coupon}-{n}", dose(coupon, dose_number=n, vaccinated_on=date(2021, 6, 1) + timedelta(days=21 * n))
            )
            for n in range(1, doses + 1)
        )
    )
    accepted = [o.accepted for o in outcomes if o.accepted is not None]
    assert [a.status for a in accepted] == ["recorded"] * doses, outcomes
    return [a.dose_id for a in accepted]


async def issue(stack: Stack, resident_id: str) -> dict[str, Any]:
    r = await stack.registry.client.post(
        f"/api/v1/municipalities/{CHIYODA}/residents/{resident_id}/certificates", json={"format": "shc"}, headers=auth()
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def correct(stack: Stack, dose_id: str, body: dict[str, Any]) -> None:
    r = await stack.records.post(
        f"/api/v1/municipalities/{CHIYODA}/doses/{dose_id}/corrections", json=body, headers=auth()
    )
    assert r.status_code == 200, r.text


async def verify(stack: Stack, card: dict[str, Any]) -> dict[str, Any]:
    r = await stack.registry.client.post("/api/v1/certificates/verify", json={"shc": card["shc"]}, headers=ANYONE)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def crl(stack: Stack) -> dict[str, Any]:
    body: dict[str, Any] = (
        await stack.registry.client.get(f"/issuer/.well-known/crl/{stack.issuer.key.kid}.json", headers=ANYONE)
    ).json()
    return body


async def rid_of(stack: Stack, card: dict[str, Any]) -> str:
    return (await verify(stack, card))["claims"]["rid"]  # type: ignore[no-any-return]


async def test_a_voided_dose_is_seen_by_the_next_anonymous_verifier(stack: Stack) -> None:
    [first, second] = await resident_with_doses(stack, "A1", "0000000001", doses=2)
    card = await issue(stack, "A1")
    assert (await verify(stack, card))["valid"] is True
    rid = await rid_of(stack, card)
    assert (await crl(stack))["rids"] == []

    await correct(stack, second, {"void": True, "reason": "recorded twice"})
    # Nobody from the municipality has looked at the resident since; an anonymous verifier asks at once.
    result = await verify(stack, card)
    assert result["valid"] is False
    assert result["reasons"] == [result["reasons"][0]] and result["reasons"][0].startswith(
        f"revoked: {certificates.DOSE_VOIDED} (revoked "
    )
    assert await crl(stack) == {"kid": stack.issuer.key.kid, "method": "rid", "ctr": 2, "rids": [rid]}
    # For good: asking again changes nothing.
    assert (await verify(stack, card))["valid"] is False
    assert (await crl(stack))["ctr"] == 2
    # The untouched first dose alone makes a new, valid card.
    new = await issue(stack, "A1")
    assert new["certificate_id"] != card["certificate_id"]
    assert (await verify(stack, new))["valid"] is True
    assert first  # the first dose stands


async def test_the_sweep_revokes_corrected_and_voided_cards_nobody_presented(stack: Stack) -> None:
    [corrected] = await resident_with_doses(stack, "B1", "0000000002", doses=1)
    [voided, _] = await resident_with_doses(stack, "B2", "0000000003", doses=2)
    await resident_with_doses(stack, "B3", "0000000004", doses=1)
    cards = {r: await issue(stack, r) for r in ("B1", "B2", "B3")}
    rids = {r: await rid_of(stack, c) for r, c in cards.items()}

    await correct(stack, corrected, {"changes": {"lot_number": "FA5765"}, "reason": "lot misread"})
    await correct(stack, voided, {"void": True, "reason": "wrong person"})
    assert (await crl(stack))["rids"] == []  # nobody verified, nobody read the residents

    records = CountingClient(stack.registry.settings.records_url)
    try:
        done = await certificates.sweep(stack.registry.databases, records, stack.issuer, batch_size=500)
        # Three certificates, one page, one records call.
        assert (done.checked, done.revoked, done.skipped) == (3, 2, False)
        assert records.calls == ["/internal/v1/dose-versions"]
        published = await crl(stack)
        assert published["ctr"] == 3 and sorted(published["rids"]) == sorted([rids["B1"], rids["B2"]])
        reasons = {r: (await verify(stack, cards[r]))["reasons"] for r in ("B1", "B2", "B3")}
        assert reasons["B1"][0].startswith(f"revoked: {certificates.DOSE_CORRECTED}")
        assert reasons["B2"][0].startswith(f"revoked: {certificates.DOSE_VOIDED}")
        assert reasons["B3"] == []
        # The next pass checks only what is left, a page at a time.
        records.calls.clear()
        again = await certificates.sweep(stack.registry.databases, records, stack.issuer, batch_size=1)
        assert (again.checked, again.revoked) == (1, 0)
        assert records.calls == ["/internal/v1/dose-versions"]
    finally:
        await records.close()


async def test_a_page_whose_grant_would_be_too_large_for_records_is_asked_in_parts(stack: Stack) -> None:
    await resident_with_doses(stack, "E1", "0000000007", doses=2)
    card = await issue(stack, "E1")
    # 999 more cards of eight doses each that records never recorded: one page of 1,000 cards would need a
    # grant of some 535,000 characters, beyond the 500,000 records accepts.
    async with stack.registry.databases.main.sessionmaker() as session, session.begin():
        for n in range(999):
            certificate_id = str(uuid.uuid4())
            session.add(
                IssuedCertificate(
                    certificate_id=certificate_id,
                    municipality_code=CHIYODA,
                    resident_id=f"F{n}",
                    kid=stack.issuer.key.kid,
                    rid=f"rid-{n}",
                    doses=[{"dose_id": str(uuid.uuid4()), "version": 1} for _ in range(8)],
                    subject_digest="0" * 64,
                    issued_at=utcnow().replace(microsecond=0),
                )
            )

    records = CountingClient(stack.registry.settings.records_url)
    try:
        done = await certificates.sweep(stack.registry.databases, records, stack.issuer, batch_size=1000)
        assert (done.checked, done.revoked, done.skipped) == (1000, 999, False)
        assert records.calls == ["/internal/v1/dose-versions"] * 2  # one page, two grants that each fit
    finally:
        await records.close()
    assert (await verify(stack, card))["valid"] is True
    assert len((await crl(stack))["rids"]) == 999


async def test_records_answers_only_what_a_fresh_registry_grant_names(stack: Stack) -> None:
    [mine, other] = await resident_with_doses(stack, "C1", "0000000005", doses=2)
    path = "/internal/v1/dose-versions"

    def grant(*doses: str) -> DoseVersionGrant:
        return DoseVersionGrant(
            certificates=[CertifiedDoses(certificate="c-1", municipality=CHIYODA, doses=list(doses))]
        )

    # No caller token is needed: the grant is the authority. The answer carries nothing about the person.
    token = sign_grant(DEV_PRIVATE_KEY, grant(mine))
    r = await stack.records.post(path, json={"grant": token, "dose_ids": [mine]})
    assert r.status_code == 200, r.text
    assert r.json() == {"doses": [{"dose_id": mine, "version": 1, "status": "recorded", "voided": False}]}
    # A dose the grant does not name, an expired grant, one signed by another key, one for another purpose.
    r = await stack.records.post(path, json={"grant": token, "dose_ids": [mine, other]})
    assert r.status_code == 403 and "dose_ids" in r.json()["detail"]
    expired = sign_grant(DEV_PRIVATE_KEY, grant(mine), lifetime=timedelta(seconds=-1))
    forged_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    forged = sign_grant(forged_key.decode(), grant(mine))
    transfer = sign_grant(
        DEV_PRIVATE_KEY, TransferGrant(caller=CHIYODA, legal_basis=["consent"], municipality=CHIYODA, coupons=["1"])
    )
    for bad in (expired, forged, transfer, "not-a-grant"):
        r = await stack.records.post(path, json={"grant": bad, "dose_ids": [mine]})
        assert r.status_code == 403 and r.json()["detail"].startswith("grant:"), r.text
    # The grant opens this one path only: every other internal read still needs the gateway's token.
    r = await stack.records.get(f"/internal/v1/municipalities/{CHIYODA}/doses", params={"coupon_number": "0000000005"})
    assert r.status_code == 401
    r = await stack.records.post(path, json={"grant": token, "dose_ids": []})
    assert r.status_code == 422 and "dose_ids" in r.text


async def test_records_unreachable_is_said_not_hidden(stack: Stack) -> None:
    await resident_with_doses(stack, "D1", "0000000006", doses=1)
    card = await issue(stack, "D1")
    app = stack.registry.app
    live = app.state.records
    app.state.records = InternalClient("http://127.0.0.1:9")  # nothing listens there
    try:
        result = await verify(stack, card)
        assert result["valid"] is False and result["reasons"] == [certificates.UNCHECKED]
        assert result["claims"]["name"] == "山田 花子"  # what the card says is still shown
        with pytest.raises(ServiceUnavailable):
            await certificates.sweep(stack.registry.databases, app.state.records, stack.issuer, batch_size=10)
    finally:
        await app.state.records.close()
        app.state.records = live
    # Not revoked for it: once records answers, the card verifies again.
    assert (await verify(stack, card))["valid"] is True
    assert (await crl(stack))["rids"] == []
