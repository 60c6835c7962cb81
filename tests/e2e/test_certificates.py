"""Certificates through the gateway, on both stacks: issue, verify anywhere, revoke by voiding a dose, export.

The card is checked the way a third party would: keys fetched from ``<iss>/.well-known/jwks.json``, the JWS
verified with jwcrypto, the payload inflated with zlib; the revocation list read from the issuer's URL.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from jwcrypto import jwk, jws
from PIL import Image
from pyzbar import pyzbar

from devtools.launcher import Stack
from tests.e2e.test_walking_skeleton import (
    CHIYODA,
    CLINIC,
    MUNI,
    OTHER_MUNI,
    dose_body,
    new_coupon_number,
    wait_until_records_knows,
)


@pytest.fixture
async def gw(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url(), timeout=30) as client:
        yield client


def jws_of(shc_text: str) -> str:
    digits = shc_text.removeprefix("shc:/")
    return "".join(chr(int(digits[i : i + 2]) + 45) for i in range(0, len(digits), 2))


def independent_decode(shc_text: str, keys: dict[str, Any]) -> dict[str, Any]:
    card = jws.JWS()
    card.deserialize(jws_of(shc_text))
    [key] = [k for k in keys["keys"] if k["kid"] == card.jose_header["kid"]]
    card.verify(jwk.JWK(**key), alg="ES256")
    payload: dict[str, Any] = json.loads(zlib.decompress(card.payload, -15))
    return payload


async def test_issue_verify_revoke_and_export_through_the_gateway(gw: httpx.AsyncClient, stack: Stack) -> None:
    coupon = new_coupon_number()
    resident_path = f"/api/v1/municipalities/{CHIYODA}/residents/c-{coupon}"
    resident = {"name": "鈴木 一郎", "name_kana": "スズキ イチロウ", "birth_date": "1948-11-03", "sex": "M"}
    r = await gw.put(resident_path, json={**resident, "coupon_number": coupon}, headers=MUNI)
    assert r.status_code == 201, r.text
    await wait_until_records_knows(gw, coupon)  # the resident reaches records through coupon-events
    dose_ids = []
    for n, day in ((1, "2021-06-01"), (2, "2021-06-22")):
        headers = {**CLINIC, "Idempotency-Key": str(uuid.uuid4())}
        r = await gw.post("/api/v1/doses", json=dose_body(coupon, dose_number=n, on=day), headers=headers)
        assert r.status_code == 201 and r.json()["status"] == "recorded", r.text
        dose_ids.append(r.json()["dose_id"])

    # A SMART Health Card, read by a third-party verifier from the issuer's published keys.
    r = await gw.post(f"{resident_path}/certificates", json={"format": "shc"}, headers=MUNI)
    assert r.status_code == 200, r.text
    card = r.json()
    [symbol] = pyzbar.decode(Image.open(io.BytesIO(base64.b64decode(card["qr_png"]))))
    assert symbol.data.decode() == card["shc"]
    # A verifier learns where the keys are from the card itself (iss), before it can check anything.
    body = jws_of(card["shc"]).split(".")[1]
    issuer = json.loads(zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)), -15))["iss"]
    assert issuer == f"{stack.url()}/issuer"
    keys = (await gw.get(f"{issuer}/.well-known/jwks.json")).json()  # no token: anyone may fetch them
    payload = independent_decode(card["shc"], keys)
    entries = payload["vc"]["credentialSubject"]["fhirBundle"]["entry"]
    assert entries[0]["resource"] == {
        "resourceType": "Patient",
        "name": [{"family": "鈴木", "given": ["一郎"]}],
        "birthDate": "1948-11-03",
    }
    assert [(e["resource"]["occurrenceDateTime"], e["resource"]["lotNumber"]) for e in entries[1:]] == [
        ("2021-06-01", "EY0583"),
        ("2021-06-22", "EY0583"),
    ]
    assert all(e["resource"]["performer"] == [{"actor": {"display": "千代田区役所"}}] for e in entries[1:])

    # The paper certificate carries the same card.
    r = await gw.post(f"{resident_path}/certificates", json={"format": "pdf"}, headers=MUNI)
    assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
    text = await asyncio.to_thread(
        subprocess.run, ["pdftotext", "-layout", "-", "-"], input=r.content, capture_output=True, check=True
    )
    page = text.stdout.decode()
    for expected in ("接種証明書", "鈴木 一郎", "1948-11-03", "東京都千代田区", card["certificate_id"]):
        assert expected in page, expected

    # Anyone verifies it, without a token; a stranger municipality cannot issue one.
    r = await gw.post("/api/v1/certificates/verify", json={"shc": card["shc"]})
    assert r.status_code == 200 and r.json()["valid"] is True, r.text
    assert r.json()["claims"]["certificate_id"] == card["certificate_id"]
    png = base64.b64decode(card["qr_png"])
    r = await gw.post("/api/v1/certificates/verify", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["valid"] is True, r.text
    r = await gw.post(f"{resident_path}/certificates", json={"format": "shc"}, headers=OTHER_MUNI)
    assert r.status_code == 404

    # Voiding dose 2 revokes the card: the very next verifier — anonymous, with no municipality read in
    # between — is told so, and the issuer's revocation list lists it.
    corrections = f"/api/v1/municipalities/{CHIYODA}/doses/{dose_ids[1]}/corrections"
    r = await gw.post(corrections, json={"void": True, "reason": "recorded twice"}, headers=MUNI)
    assert r.status_code == 200, r.text
    r = await gw.post("/api/v1/certificates/verify", json={"shc": card["shc"]})
    assert r.json()["valid"] is False, r.text
    assert r.json()["reasons"][0].startswith("revoked: a dose on the card was voided in the records")
    keys = (await gw.get(f"{issuer}/.well-known/jwks.json")).json()
    [key] = keys["keys"]
    crl = (await gw.get(f"{issuer}/.well-known/crl/{key['kid']}.json")).json()
    assert crl["method"] == "rid" and crl["ctr"] == key["crlVersion"]
    assert payload["vc"]["rid"] in crl["rids"]

    new = (await gw.post(f"{resident_path}/certificates", json={"format": "shc"}, headers=MUNI)).json()
    assert new["certificate_id"] != card["certificate_id"]
    assert len(independent_decode(new["shc"], keys)["vc"]["credentialSubject"]["fhirBundle"]["entry"]) == 2
    assert (await gw.post("/api/v1/certificates/verify", json={"shc": new["shc"]})).json()["valid"] is True

    # FHIR export: both doses, the voided one entered-in-error.
    r = await gw.get(f"{resident_path}/fhir", headers=MUNI)
    assert r.status_code == 200
    bundle = r.json()
    Bundle.model_validate(bundle)
    statuses = {e["resource"]["id"]: e["resource"]["status"] for e in bundle["entry"][1:]}
    assert statuses == {dose_ids[0]: "completed", dose_ids[1]: "entered-in-error"}
    assert (await gw.get(f"{resident_path}/fhir", headers=OTHER_MUNI)).status_code == 404


def sweep_once(stack: Stack) -> str:
    """One pass of registry's revocation sweep, as ``vrs certificates sweep --once`` runs it (the API's own
    sweep runs every 30 s; a pass it is in the middle of makes ours wait and go again)."""
    for _ in range(50):
        done = subprocess.run(
            [sys.executable, "-m", "shared.cli", "certificates", "sweep", "--once"],
            env=stack.env,
            capture_output=True,
            text=True,
            check=True,
        )
        if "another replica" not in done.stdout:
            return done.stdout
    raise AssertionError("the sweep never got its turn")


async def test_a_corrected_dose_reaches_the_revocation_list_with_the_sweep(gw: httpx.AsyncClient, stack: Stack) -> None:
    coupon = new_coupon_number()
    resident_path = f"/api/v1/municipalities/{CHIYODA}/residents/s-{coupon}"
    resident = {"name": "佐藤 二郎", "name_kana": "サトウ ジロウ", "birth_date": "1951-02-03", "sex": "M"}
    r = await gw.put(resident_path, json={**resident, "coupon_number": coupon}, headers=MUNI)
    assert r.status_code == 201, r.text
    await wait_until_records_knows(gw, coupon)
    headers = {**CLINIC, "Idempotency-Key": str(uuid.uuid4())}
    r = await gw.post("/api/v1/doses", json=dose_body(coupon, dose_number=1, on="2021-06-01"), headers=headers)
    assert r.status_code == 201 and r.json()["status"] == "recorded", r.text
    dose_id = r.json()["dose_id"]
    card = (await gw.post(f"{resident_path}/certificates", json={"format": "shc"}, headers=MUNI)).json()
    keys = (await gw.get(f"{stack.url()}/issuer/.well-known/jwks.json")).json()
    rid = independent_decode(card["shc"], keys)["vc"]["rid"]
    [key] = keys["keys"]
    crl_url = f"{stack.url()}/issuer/.well-known/crl/{key['kid']}.json"
    assert rid not in (await gw.get(crl_url)).json()["rids"]

    # The lot number is corrected; nobody verifies the card and nobody reads the resident.
    r = await gw.post(
        f"/api/v1/municipalities/{CHIYODA}/doses/{dose_id}/corrections",
        json={"changes": {"lot_number": "FA5765"}, "reason": "lot misread"},
        headers=MUNI,
    )
    assert r.status_code == 200, r.text
    sweep_once(stack)
    # An offline verifier holding only the issuer's documents now rejects the card.
    crl = (await gw.get(crl_url)).json()
    assert rid in crl["rids"]
    key_now = (await gw.get(f"{stack.url()}/issuer/.well-known/jwks.json")).json()["keys"][0]
    assert crl["ctr"] == key_now["crlVersion"] > key["crlVersion"]
    r = await gw.post("/api/v1/certificates/verify", json={"shc": card["shc"]})
    assert r.json()["valid"] is False
    assert r.json()["reasons"][0].startswith("revoked: a dose on the card was corrected in the records")
