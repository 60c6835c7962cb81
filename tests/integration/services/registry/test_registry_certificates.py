"""Certificates as registry issues them, read back by independent tools.

Cards are decoded with jwcrypto + zlib (not our code), FHIR with ``fhir.resources`` (R4B models), QR codes with
zbar (pyzbar), the PDF with poppler (pdftotext, pdftoppm). records is a stand-in that answers its internal dose
read from a list the test controls, so corrections and voids can be played exactly.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
import subprocess
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.immunization import Immunization
from fhir.resources.R4B.patient import Patient
from jose import jwt
from jwcrypto import jwk, jws
from PIL import Image
from pyzbar import pyzbar

from services.registry import certificates, fhir, shc
from services.registry.app import create_app
from services.registry.certificate_pdf import DOSE_COLUMNS, LEFT, PERSON_COLUMNS, CertificateView, render
from services.registry.settings import RegistrySettings
from shared.auth import Role, forwarded_authorization, principal_from_claims
from shared.errors import ServiceUnavailable
from shared.grants import DEV_PUBLIC_KEY, DoseVersionGrant, InvalidGrant, open_grant
from shared.migrations import upgrade
from tests.factories import InternalHeaders, internal_headers, unavailable

TREES = Path(__file__).resolve().parents[4] / "services" / "registry" / "migrations"
CHIYODA, SAPPORO = "131016", "011002"
ISSUER = "https://vrs.example.jp/issuer"
RESIDENT = {
    "name": "山田 花子",
    "name_kana": "ヤマダ ハナコ",
    "birth_date": "1950-04-02",
    "sex": "F",
    "coupon_number": "0000012345",
}


@dataclass
class FakeRecords:
    """records' internal dose read, answered from ``doses`` (voided ones too, as records does).

    Like records, it answers the resident read only to the municipality itself, on whose behalf registry
    forwards the caller's token, and the dose-version check only under a registry-signed grant naming the
    doses asked about (the real grant check). ``down``: records does not answer.
    """

    doses: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    down: bool = False

    async def request(self, method: str, path: str, json: Any = None, **_: Any) -> tuple[int, Any]:
        self.calls.append((method, path))
        if self.down:
            raise ServiceUnavailable("a backing service did not answer; retry")
        if path == "/internal/v1/dose-versions":
            try:
                named = open_grant(DEV_PUBLIC_KEY, json["grant"], DoseVersionGrant).dose_ids()
            except InvalidGrant:
                return 403, {"error": "Forbidden"}
            if not set(json["dose_ids"]) <= named.keys():
                return 403, {"error": "Forbidden"}
            fields = ("dose_id", "version", "status", "voided")
            return 200, {"doses": [{k: d[k] for k in fields} for d in self.doses if d["dose_id"] in json["dose_ids"]]}
        # What InternalClient sends: the internal token of the request being served.
        token = (forwarded_authorization.get() or "").removeprefix("Bearer ")
        caller = principal_from_claims(jwt.get_unverified_claims(token), allow_anonymous=True)
        if caller.municipality != CHIYODA or not path.startswith(f"/internal/v1/municipalities/{CHIYODA}/"):
            return 403, {"error": "Forbidden"}
        return 200, {"doses": self.doses}

    async def close(self) -> None:
        return None


def dose(n: int, on: str, *, vaccine: str = "pfizer", lot: str = "EY0583", **changes: Any) -> dict[str, Any]:
    return {
        "dose_id": str(uuid.uuid4()),
        "dose_number": n,
        "vaccinated_on": on,
        "vaccine": vaccine,
        "lot_number": lot,
        "status": "recorded",
        "municipality": CHIYODA,
        "coupon_number": RESIDENT["coupon_number"],
        "venue": "千代田区役所",
        "voided": False,
        "version": 1,
    } | changes


@asynccontextmanager
async def running_registry(folder: Path, records: FakeRecords, **changes: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = RegistrySettings(
        main_dsn=f"sqlite+aiosqlite:///{folder / 'main.db'}",
        shard_dsns={s: f"sqlite+aiosqlite:///{folder / f'{s}.db'}" for s in ("s0", "s1")},
        records_url="http://127.0.0.1:9",
        run_relay=False,  # coupon events are not what these tests are about
        shc_issuer=ISSUER,
        certificate_sweep_seconds=0,  # the sweep's passes are driven in test_registry_certificate_revocation.py
        **changes,
    )
    await asyncio.to_thread(upgrade, settings.main_dsn, TREES / "main")
    for dsn in settings.shard_dsns.values():
        await asyncio.to_thread(upgrade, dsn, TREES / "shard")
    app: FastAPI = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://registry", headers=internal_headers(Role.ANONYMOUS)
        ) as client,
    ):
        await app.state.records.close()
        app.state.records = records
        yield client


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FakeRecords]]:
    records = FakeRecords()
    async with running_registry(tmp_path, records) as client:
        r = await client.put(f"/api/v1/municipalities/{CHIYODA}/residents/A1", json=RESIDENT, headers=muni())
        assert r.status_code == 201, r.text
        yield client, records


def muni(code: str = CHIYODA) -> InternalHeaders:
    return internal_headers(Role.MUNICIPALITY, municipality=code)


CERTS = f"/api/v1/municipalities/{CHIYODA}/residents/A1/certificates"


async def issue(client: httpx.AsyncClient, fmt: str = "shc") -> httpx.Response:
    r = await client.post(CERTS, json={"format": fmt}, headers=muni())
    assert r.status_code == 200, r.text
    return r


async def issuer_key(client: httpx.AsyncClient) -> tuple[jwk.JWK, dict[str, Any]]:
    r = await client.get("/issuer/.well-known/jwks.json")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    [key] = r.json()["keys"]
    return jwk.JWK(**key), key


def decode_independently(shc_text: str, key: jwk.JWK) -> tuple[dict[str, Any], dict[str, Any]]:
    """A verifier written from the spec with jwcrypto and zlib: numeric → JWS → verify → inflate."""
    digits = shc_text.removeprefix("shc:/")
    token = "".join(chr(int(digits[i : i + 2]) + 45) for i in range(0, len(digits), 2))
    verifier = jws.JWS()
    verifier.deserialize(token)
    verifier.verify(key, alg="ES256")  # raises on a bad signature
    return verifier.jose_header, json.loads(zlib.decompress(verifier.payload, -15))


async def test_card_decodes_with_an_independent_verifier_field_by_field(
    registry: tuple[httpx.AsyncClient, FakeRecords],
) -> None:
    client, records = registry
    first, second = dose(1, "2021-06-01"), dose(2, "2021-06-22", lot="FA5765")
    review = dose(3, "2022-01-10", status="needs_review")
    records.doses = [second, first, review, dose(2, "2021-06-20", voided=True, version=2)]
    body = (await issue(client)).json()
    assert set(body) == {"certificate_id", "shc", "qr_png"}
    key, published = await issuer_key(client)

    header, payload = decode_independently(body["shc"], key)
    assert header == {"alg": "ES256", "zip": "DEF", "kid": key.thumbprint()}
    assert published["kid"] == key.thumbprint() and published["crlVersion"] == 1
    assert payload["iss"] == ISSUER and isinstance(payload["nbf"], int)
    vc = payload["vc"]
    assert "https://smarthealth.cards#health-card" in vc["type"]
    assert vc["credentialSubject"]["fhirVersion"] == "4.0.1"
    assert len(vc["rid"]) <= 24
    bundle = vc["credentialSubject"]["fhirBundle"]
    Bundle.model_validate(bundle)  # a valid FHIR Bundle, by a third-party model
    entries = bundle["entry"]
    assert [e["fullUrl"] for e in entries] == ["resource:0", "resource:1", "resource:2"]
    patient = entries[0]["resource"]
    # Name and birth date only: no sex, address, coupon, My Number, resident id.
    assert patient == {
        "resourceType": "Patient",
        "name": [{"family": "山田", "given": ["花子"]}],
        "birthDate": "1950-04-02",
    }
    # Recorded doses only, in date order: not the voided one, not the one awaiting review.
    shots = [e["resource"] for e in entries[1:]]
    assert [(s["occurrenceDateTime"], s["lotNumber"]) for s in shots] == [
        ("2021-06-01", "EY0583"),
        ("2021-06-22", "FA5765"),
    ]
    for s in shots:
        assert s["status"] == "completed"
        assert s["vaccineCode"] == {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "208"}]}
        assert s["patient"] == {"reference": "resource:0"}
        assert s["performer"] == [{"actor": {"display": "千代田区役所"}}]
        assert not {"id", "meta", "text"} & set(s)

    # The QR code, read by zbar, carries exactly the same string.
    png = base64.b64decode(body["qr_png"])
    [symbol] = pyzbar.decode(Image.open(io.BytesIO(png)))
    assert symbol.type == "QRCODE" and symbol.data.decode() == body["shc"]


async def test_same_doses_same_certificate_and_our_verifier_accepts_it(
    registry: tuple[httpx.AsyncClient, FakeRecords],
) -> None:
    client, records = registry
    records.doses = [dose(1, "2021-06-01")]
    a, b = (await issue(client)).json(), (await issue(client)).json()
    assert a == b  # a retry issues nothing new: the same certificate, the same card byte for byte
    r = await client.post("/api/v1/certificates/verify", json={"shc": a["shc"]})
    assert r.status_code == 200
    result = r.json()
    assert result["valid"] is True and result["reasons"] == []
    claims = result["claims"]
    assert claims["name"] == "山田 花子" and claims["birth_date"] == "1950-04-02"
    assert claims["issuer"] == ISSUER and claims["certificate_id"] == a["certificate_id"]
    assert claims["immunizations"] == [
        {
            "date": "2021-06-01",
            "vaccine_code": "208",
            "vaccine": "Pfizer-BioNTech COVID-19 (Comirnaty)",
            "lot_number": "EY0583",
            "performer": "千代田区役所",
        }
    ]
    # The same card as a picture of its QR code.
    r = await client.post(
        "/api/v1/certificates/verify",
        content=base64.b64decode(a["qr_png"]),
        headers={"Content-Type": "image/png"},
    )
    assert r.json()["valid"] is True


@pytest.fixture
def tokyo_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is Japan's, as on a municipality's own server."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def test_a_reissued_card_and_paper_keep_their_issue_time_whatever_the_host_time_zone(
    registry: tuple[httpx.AsyncClient, FakeRecords], tokyo_host: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, records = registry
    records.doses = [dose(1, "2021-06-01")]
    # 20:00 UTC is 05:00 the next day in Japan: the paper's 発行年月日 is that next day.
    issued = datetime(2024, 12, 10, 20, 0, 0, tzinfo=UTC)
    monkeypatch.setattr(certificates, "utcnow", lambda: issued)
    first = (await issue(client)).json()
    # Read back from SQLite, which keeps no time zone, by a host whose local time is not UTC.
    again = (await issue(client)).json()
    pdf = (await issue(client, "pdf")).content
    key, _ = await issuer_key(client)
    assert decode_independently(first["shc"], key)[1]["nbf"] == int(issued.timestamp())
    assert again == first
    if shutil.which("pdftotext") is None:
        unavailable("poppler-utils is not installed (apt-get install poppler-utils)")
    text = await asyncio.to_thread(
        subprocess.run, ["pdftotext", "-layout", "-", "-"], input=pdf, capture_output=True, check=True
    )
    assert "2024-12-11" in text.stdout.decode()


async def test_tampered_card_is_rejected_by_us_and_by_the_independent_verifier(
    registry: tuple[httpx.AsyncClient, FakeRecords],
) -> None:
    client, records = registry
    records.doses = [dose(1, "2021-06-01")]
    card = (await issue(client)).json()["shc"]
    key, _ = await issuer_key(client)
    digits = card.removeprefix("shc:/")
    token = "".join(chr(int(digits[i : i + 2]) + 45) for i in range(0, len(digits), 2))
    header, body, signature = token.split(".")
    # Re-compress a payload with another lot number, keep the signature.
    payload = json.loads(zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)), -15))
    payload["vc"]["credentialSubject"]["fhirBundle"]["entry"][1]["resource"]["lotNumber"] = "XX0000"
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    forged_body = base64.urlsafe_b64encode(c.compress(json.dumps(payload).encode()) + c.flush()).rstrip(b"=").decode()
    forged = "shc:/" + "".join(f"{ord(ch) - 45:02d}" for ch in f"{header}.{forged_body}.{signature}")

    with pytest.raises(jws.InvalidJWSSignature):
        decode_independently(forged, key)
    calls_before = len(records.calls)
    result = (await client.post("/api/v1/certificates/verify", json={"shc": forged})).json()
    assert result["valid"] is False
    assert any(r.startswith("signature:") for r in result["reasons"])
    assert result["claims"]["immunizations"][0]["lot_number"] == "XX0000"  # what it claims, shown as such
    assert len(records.calls) == calls_before  # a forged card never reaches records

    # A well-formed card with our issuer's name, signed by someone else's key.
    other = shc.IssuerKey.from_private(ec.generate_private_key(ec.SECP256R1()))
    foreign = shc.to_numeric(shc.sign(payload, other))
    result = (await client.post("/api/v1/certificates/verify", json={"shc": foreign})).json()
    assert result["valid"] is False and result["reasons"][0].startswith("key:")
    assert len(records.calls) == calls_before


async def test_void_revokes_the_card_in_the_verifier_and_the_crl(
    registry: tuple[httpx.AsyncClient, FakeRecords],
) -> None:
    client, records = registry
    first, second = dose(1, "2021-06-01"), dose(2, "2021-06-22")
    records.doses = [first, second]
    old = (await issue(client)).json()
    key, _ = await issuer_key(client)
    _, old_payload = decode_independently(old["shc"], key)
    rid = old_payload["vc"]["rid"]

    second.update(voided=True, version=2)  # the municipality voids dose 2 in records
    # Anyone verifying it next — no login, no municipality read in between — gets the live answer.
    result = (await client.post("/api/v1/certificates/verify", json={"shc": old["shc"]})).json()
    assert result["valid"] is False and result["reasons"][0].startswith("revoked: a dose on the card was voided")
    assert records.calls[-1] == ("POST", "/internal/v1/dose-versions")
    # Revoked for good: records is not asked again.
    calls = len(records.calls)
    result = (await client.post("/api/v1/certificates/verify", json={"shc": old["shc"]}, headers=muni())).json()
    assert result["valid"] is False and result["reasons"][0].startswith("revoked:")
    assert len(records.calls) == calls

    # The spec's revocation list: the key's crlVersion moved, and the old card's rid is listed.
    key, published = await issuer_key(client)
    assert published["crlVersion"] == 2
    r = await client.get(f"/issuer/.well-known/crl/{published['kid']}.json")
    assert r.status_code == 200
    assert r.json() == {"kid": published["kid"], "method": "rid", "ctr": 2, "rids": [rid]}

    # The next card shows one dose, is a new certificate, and is valid.
    new = (await issue(client)).json()
    assert new["certificate_id"] != old["certificate_id"]
    _, payload = decode_independently(new["shc"], key)
    assert len(payload["vc"]["credentialSubject"]["fhirBundle"]["entry"]) == 2
    assert (
        payload["vc"]["rid"]
        not in (await client.get(f"/issuer/.well-known/crl/{published['kid']}.json")).json()["rids"]
    )
    assert (await client.post("/api/v1/certificates/verify", json={"shc": new["shc"]})).json()["valid"] is True


async def test_a_correction_revokes_at_the_next_issue_without_any_verification(
    registry: tuple[httpx.AsyncClient, FakeRecords],
) -> None:
    client, records = registry
    first = dose(1, "2021-06-01")
    records.doses = [first]
    old = (await issue(client)).json()
    first.update(lot_number="EY0584", version=2)
    new = (await issue(client)).json()
    assert new["certificate_id"] != old["certificate_id"]
    result = (await client.post("/api/v1/certificates/verify", json={"shc": old["shc"]})).json()
    assert result["valid"] is False and "revoked" in result["reasons"][0]


async def test_renamed_resident_revokes_the_card(registry: tuple[httpx.AsyncClient, FakeRecords]) -> None:
    client, records = registry
    records.doses = [dose(1, "2021-06-01")]
    old = (await issue(client)).json()
    r = await client.put(
        f"/api/v1/municipalities/{CHIYODA}/residents/A1", json={**RESIDENT, "name": "佐藤 花子"}, headers=muni()
    )
    assert r.status_code == 200
    result = (await client.post("/api/v1/certificates/verify", json={"shc": old["shc"]})).json()
    assert result["valid"] is False and "revoked" in result["reasons"][0]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "field"),
    [
        (b'{"shc": "hello"}', "application/json", 422, "shc"),
        (b'{"card": "shc:/00"}', "application/json", 422, "shc"),
        (b"not json", "application/json", 422, "body"),
        (b"shc:/00", "text/plain", 400, None),
    ],
)
async def test_verify_names_what_is_wrong_with_the_request(
    registry: tuple[httpx.AsyncClient, FakeRecords], body: bytes, content_type: str, status: int, field: str | None
) -> None:
    client, _ = registry
    r = await client.post("/api/v1/certificates/verify", content=body, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text
    if field is not None:
        assert field in [e["field"] for e in r.json()["errors"]]


async def test_verify_rejects_garbage_cards_and_pictures(registry: tuple[httpx.AsyncClient, FakeRecords]) -> None:
    client, _ = registry
    r = await client.post("/api/v1/certificates/verify", json={"shc": "shc:/5676"})
    assert r.status_code == 200 and r.json()["valid"] is False and r.json()["reasons"][0].startswith("format:")
    blank = io.BytesIO()
    Image.new("L", (64, 64), 255).save(blank, format="PNG")
    r = await client.post(
        "/api/v1/certificates/verify", content=blank.getvalue(), headers={"Content-Type": "image/png"}
    )
    assert r.json() == {
        "valid": False,
        "reasons": ['format: no QR code with an "shc:/" string was found in the image'],
        "claims": {},
    }
    r = await client.post("/api/v1/certificates/verify", content=b"\x89PNG junk", headers={"Content-Type": "image/png"})
    assert r.json()["valid"] is False


async def test_issuing_needs_a_recorded_dose_and_the_own_municipality(
    registry: tuple[httpx.AsyncClient, FakeRecords],
) -> None:
    client, records = registry
    records.doses = [dose(1, "2021-06-01", status="needs_review")]
    r = await client.post(CERTS, json={"format": "shc"}, headers=muni())
    assert r.status_code == 409 and "no recorded dose" in r.json()["detail"]
    records.doses = [dose(1, "2021-06-01")]
    stranger = await client.post(CERTS, json={"format": "shc"}, headers=muni(SAPPORO))
    unknown = await client.post(CERTS.replace("A1", "A404"), json={"format": "shc"}, headers=muni())
    assert stranger.status_code == unknown.status_code == 404 and stranger.json() == unknown.json()
    r = await client.post(CERTS, json={"format": "jpeg"}, headers=muni())
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "format"
    r = await client.get("/issuer/.well-known/crl/not-our-kid.json")
    assert r.status_code == 404


async def test_fhir_export_validates_and_marks_voided_doses(registry: tuple[httpx.AsyncClient, FakeRecords]) -> None:
    client, records = registry
    first, voided = dose(1, "2021-06-01"), dose(2, "2021-06-22", vaccine="moderna", voided=True, version=2)
    records.doses = [voided, first]
    r = await client.get(f"/api/v1/municipalities/{CHIYODA}/residents/A1/fhir", headers=muni())
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    data = r.json()
    bundle = Bundle.model_validate(data)  # the whole bundle, every resource in it, by the R4B models
    assert bundle.type == "collection" and bundle.entry is not None and len(bundle.entry) == 3
    patient = Patient.model_validate(data["entry"][0]["resource"])
    shots = [Immunization.model_validate(e["resource"]) for e in data["entry"][1:]]
    assert patient.birthDate is not None and patient.birthDate.isoformat() == "1950-04-02"
    assert patient.gender == "female" and patient.name and patient.name[0].family == "山田"
    assert patient.identifier and patient.identifier[0].value == "A1"
    summary = [
        (
            s.status,
            s.vaccineCode.coding[0].code if s.vaccineCode.coding else None,
            s.protocolApplied[0].doseNumberPositiveInt if s.protocolApplied else None,
        )
        for s in shots
    ]
    assert summary == [("completed", "208", 1), ("entered-in-error", "207", 2)]
    assert {s.id for s in shots} == {first["dose_id"], voided["dose_id"]}
    assert all(s.patient.reference == data["entry"][0]["fullUrl"] for s in shots)
    other = await client.get(f"/api/v1/municipalities/{CHIYODA}/residents/A1/fhir", headers=muni(SAPPORO))
    assert other.status_code == 404


async def run(*args: str) -> str:
    done = await asyncio.to_thread(subprocess.run, args, capture_output=True, check=True, text=True)
    return done.stdout


async def test_pdf_certificate_text_font_and_qr(
    registry: tuple[httpx.AsyncClient, FakeRecords], tmp_path: Path
) -> None:
    if shutil.which("pdftotext") is None:
        unavailable("poppler-utils is not installed (apt-get install poppler-utils)")
    client, records = registry
    records.doses = [dose(1, "2021-06-01"), dose(2, "2021-06-22", lot="FA5765")]
    r = await issue(client, "pdf")
    assert r.headers["content-type"] == "application/pdf"
    assert (await issue(client, "pdf")).content == r.content  # the same certificate is the same file
    pdf = tmp_path / "certificate.pdf"
    pdf.write_bytes(r.content)
    card = (await issue(client)).json()  # the same doses: the card on the paper

    text = await run("pdftotext", "-layout", str(pdf), "-")
    for expected in [
        "予防接種証明書", "Vaccination Certificate",
        "氏名 / Name", "山田 花子", "生年月日 / Date of birth", "1950-04-02",
        "接種日 / Date", "2021-06-01", "2021-06-22",
        "ロット番号 / Lot", "EY0583", "FA5765",
        "1回目 / No. 1", "2回目 / No. 2",
        "ファイザー / Pfizer-BioNTech COVID-19 (Comirnaty)",
        "発行自治体 / Issuing municipality",
        "発行年月日 / Date of issue",
        "証明書番号 / Certificate ID", card["certificate_id"],
    ]:  # fmt: skip
        assert expected in text, expected
    fonts = await run("pdffonts", str(pdf))
    rows = fonts.splitlines()[2:]
    assert rows and all("IPAexGothic" in row and "yes yes yes" in row for row in rows), fonts  # embedded subsets

    await run("pdftoppm", "-r", "150", "-png", "-singlefile", str(pdf), str(tmp_path / "page"))
    page = Image.open(tmp_path / "page.png")
    [symbol] = pyzbar.decode(page)
    assert symbol.data.decode() == card["shc"]


# The longest values records and registry accept, of characters that never repeat (nothing for DEFLATE).
LONGEST_NAME = "".join(chr(0x4E00 + 7 * i) for i in range(49)) + " " + "".join(chr(0x5200 + 7 * i) for i in range(50))


def longest_dose(n: int) -> dict[str, Any]:
    on = date(2021, 6, 1) + timedelta(days=120 * (n - 1))
    lot = "".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[(7 * n + 13 * j + j * j) % 36] for j in range(20))
    venue = "".join(chr(0x6000 + 11 * (30 * n + j)) for j in range(30))
    return dose(n, on.isoformat(), lot=lot, venue=venue)


async def test_ten_doses_with_the_longest_values_fit_one_qr_code_and_the_paper_says_which(
    registry: tuple[httpx.AsyncClient, FakeRecords], tmp_path: Path
) -> None:
    client, records = registry
    r = await client.put(
        f"/api/v1/municipalities/{CHIYODA}/residents/A1", json={**RESIDENT, "name": LONGEST_NAME}, headers=muni()
    )
    assert r.status_code == 200, r.text
    records.doses = [longest_dose(n) for n in range(1, 11)]
    card = (await issue(client)).json()
    assert (await issue(client)).json() == card  # the same doses: the same card, byte for byte

    key, _ = await issuer_key(client)
    _, payload = decode_independently(card["shc"], key)
    assert len(card["shc"]) - len("shc:/") <= 2 * shc.MAX_SINGLE_QR_JWS
    png = Image.open(io.BytesIO(base64.b64decode(card["qr_png"])))
    assert (png.width // 4 - 2 * 4 - 17) // 4 <= 22  # 4 px a module, a 4-module quiet zone: version ≤ 22
    [symbol] = pyzbar.decode(png)
    assert symbol.data.decode() == card["shc"]
    shots = [e["resource"] for e in payload["vc"]["credentialSubject"]["fhirBundle"]["entry"][1:]]
    # The venues went first, then the oldest doses: the card holds the latest ones, lots and dates intact.
    held = records.doses[-len(shots) :]
    assert 0 < len(shots) < 10 and not any("performer" in s for s in shots)
    assert [(s["occurrenceDateTime"], s["lotNumber"]) for s in shots] == [
        (d["vaccinated_on"], d["lot_number"]) for d in held
    ]

    if shutil.which("pdftotext") is None:
        unavailable("poppler-utils is not installed (apt-get install poppler-utils)")
    pdf = tmp_path / "certificate.pdf"
    pdf.write_bytes((await issue(client, "pdf")).content)
    text = await run("pdftotext", "-layout", str(pdf), "-")
    assert f"The QR code holds the latest {len(shots)} of the 10 doses" in text
    assert all(d["vaccinated_on"] in text for d in records.doses)  # the paper lists every dose


FONT = Path("/usr/share/fonts/opentype/ipaexfont-gothic/ipaexg.ttf")
WORD = re.compile(r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="([\d.]+)">([^<]*)</word>')


def test_the_longest_values_stay_inside_their_cells_on_paper(tmp_path: Path) -> None:
    if shutil.which("pdftotext") is None or not FONT.is_file():
        unavailable("poppler-utils or fonts-ipaexfont is not installed")
    lot = "ABCDEFGHIJKLMNOPQRST"  # the longest lot records accepts
    # 100 characters, the longest name registry accepts, of kanji the font has.
    name = ("山田花子佐藤鈴木高橋伊藤渡辺中村小林加藤吉田松本井上清水斎森池阿部石川前野岡長谷坂遠藤原太郎" * 3)[:100]
    kana = ("ヤマダハナコ" * 34)[:200]  # 200
    doses = [
        fhir.Dose(str(n), n, date(2021, 6, 1) + timedelta(days=120 * n), vaccine, lot, None, voided=False)
        for n, vaccine in enumerate(["pfizer", "moderna", "astrazeneca", "novavax"] * 2 + ["pfizer"] * 2, start=1)
    ]
    jws_text, _ = certificates.signed_card(
        shc.IssuerKey.from_private(ec.generate_private_key(ec.SECP256R1())),
        issuer=ISSUER,
        nbf=1733900000,
        rid="M-EyzklSfdI",
        person=fhir.Person(CHIYODA, "A1", name, kana, date(1950, 4, 2), "F"),
        doses=doses,
    )
    view = CertificateView(
        str(uuid.uuid4()), name, kana, date(1950, 4, 2), "千代田区", date(2024, 12, 11), doses, shc.to_numeric(jws_text)
    )
    pdf = tmp_path / "certificate.pdf"
    pdf.write_bytes(render(view, font_path=FONT))
    boxes = subprocess.run(["pdftotext", "-bbox", str(pdf), "-"], capture_output=True, check=True, text=True).stdout
    words = [(float(x0), float(y0), float(x1), text) for x0, y0, x1, _, text in WORD.findall(boxes)]

    def fragments(value: str, column: tuple[float, float]) -> list[str]:
        """The words that are pieces of ``value``, each checked to lie inside ``column`` (x in points)."""
        pieces = [(y, x0, x1, text) for x0, y, x1, text in words if len(text) > 1 and text in value]
        for _, x0, x1, text in pieces:
            assert column[0] <= x0 and x1 <= column[1], (text, x0, x1, column)
        return [text for *_, text in sorted(pieces)]

    # Both in points from the page's left edge: reportlab's unit and the PDF's, which pdftotext reports.
    value_column = (LEFT + PERSON_COLUMNS[0], LEFT + sum(PERSON_COLUMNS))
    lot_column = (LEFT + sum(DOSE_COLUMNS[:3]), LEFT + sum(DOSE_COLUMNS))
    assert "".join(fragments(name, value_column)) == name  # wrapped, whole, inside its cell
    assert "".join(fragments(kana, value_column)) == kana
    assert "".join(fragments(lot, lot_column)) == lot * len(doses)
    # The QR code is still read back, whether or not it had to go to a page of its own.
    subprocess.run(["pdftoppm", "-r", "150", "-png", str(pdf), str(tmp_path / "page")], check=True)
    found = [s.data.decode() for page in sorted(tmp_path.glob("page*.png")) for s in pyzbar.decode(Image.open(page))]
    assert found == [view.shc]


async def test_reading_the_resident_revokes_a_stale_card_before_anyone_verifies_it(
    registry: tuple[httpx.AsyncClient, FakeRecords],
) -> None:
    client, records = registry
    first = dose(1, "2021-06-01")
    records.doses = [first]
    card = (await issue(client)).json()
    key, published = await issuer_key(client)
    rid = decode_independently(card["shc"], key)[1]["vc"]["rid"]
    crl = f"/issuer/.well-known/crl/{published['kid']}.json"
    assert (await client.get(crl)).json()["rids"] == []

    first.update(voided=True, version=2)
    r = await client.get(f"/api/v1/municipalities/{CHIYODA}/residents/A1", headers=muni())
    assert r.status_code == 200 and [d["voided"] for d in r.json()["doses"]] == [True]
    # An offline verifier that only reads the revocation list now rejects the card.
    assert (await client.get(crl)).json() == {"kid": published["kid"], "method": "rid", "ctr": 2, "rids": [rid]}


async def test_key_rollover_keeps_old_cards_verifiable(tmp_path: Path) -> None:
    records = FakeRecords(doses=[dose(1, "2021-06-01")])
    async with running_registry(tmp_path, records) as client:
        assert (
            await client.put(f"/api/v1/municipalities/{CHIYODA}/residents/A1", json=RESIDENT, headers=muni())
        ).is_success
        old = (await issue(client)).json()
        old_key, _ = await issuer_key(client)

    new_key = jwk.JWK.generate(kty="EC", crv="P-256")
    retired = old_key.export_public()
    rolled = {"shc_private_key": new_key.export_to_pem(private_key=True, password=None).decode()}
    async with running_registry(tmp_path, records, shc_retired_public_keys=[retired], **rolled) as client:
        keys = (await client.get("/issuer/.well-known/jwks.json")).json()["keys"]
        assert {k["kid"] for k in keys} == {old_key.thumbprint(), new_key.thumbprint()}
        assert all("d" not in k for k in keys)
        result = (await client.post("/api/v1/certificates/verify", json={"shc": old["shc"]})).json()
        assert result["valid"] is True, result  # signed by the retired key, doses unchanged
        new = (await issue(client)).json()
        assert new["certificate_id"] != old["certificate_id"]
        header, _ = decode_independently(new["shc"], jwk.JWK(**new_key.export_public(as_dict=True)))
        assert header["kid"] == new_key.thumbprint()
        assert (await client.get(f"/issuer/.well-known/crl/{old_key.thumbprint()}.json")).json()["rids"] == []

    # Without the retired key, its cards no longer verify.
    async with running_registry(tmp_path, records, **rolled) as client:
        result = (await client.post("/api/v1/certificates/verify", json={"shc": old["shc"]})).json()
        assert result["valid"] is False and result["reasons"][0].startswith("key:")
