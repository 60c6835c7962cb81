"""SMART Health Card encoding rules, checked against the spec's examples and an independent JOSE library."""

from __future__ import annotations

import json
import zlib
from datetime import date

import pytest
from jwcrypto import jwk, jws

from services.registry import fhir, shc
from services.registry.settings import DEV_SHC_PRIVATE_KEY
from shared.domain.vaccines import default_rules

KEY = shc.IssuerKey.load(DEV_SHC_PRIVATE_KEY)


@pytest.mark.parametrize(
    ("jws_text", "numeric"),
    [
        # Each character is its code point minus 45, two digits: "-" is 00, "z" is 77.
        ("-", "shc:/00"),
        ("z", "shc:/77"),
        ("eyJ", "shc:/567629"),
        ("a.b_c", "shc:/5201535054"),
    ],
)
def test_numeric_encoding_both_ways(jws_text: str, numeric: str) -> None:
    assert shc.to_numeric(jws_text) == numeric
    assert shc.from_numeric(numeric) == jws_text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("shc:/123", "even number"),
        ("shc:/78", "out of range"),
        ("shc:/", "single-chunk"),
        ("shc:/1/2/0102", "single-chunk"),  # the deprecated chunked form
        ("http://x", "single-chunk"),
    ],
)
def test_numeric_strings_that_are_refused(text: str, reason: str) -> None:
    with pytest.raises(shc.CardError, match=reason):
        shc.from_numeric(text)


def test_characters_outside_the_jws_alphabet_are_refused() -> None:
    with pytest.raises(ValueError):
        shc.to_numeric("a b")


def test_kid_is_the_rfc7638_thumbprint_as_jwcrypto_computes_it() -> None:
    public = jwk.JWK(**KEY.public_jwk())
    assert KEY.kid == public.thumbprint()  # SHA-256, base64url, as the spec requires
    assert KEY.public_jwk()["alg"] == "ES256" and KEY.public_jwk()["use"] == "sig"
    assert "d" not in KEY.public_jwk()


def test_a_private_jwk_loads_to_the_same_key() -> None:
    private = jwk.JWK.from_pem(DEV_SHC_PRIVATE_KEY.encode())
    assert shc.IssuerKey.load(private.export_private()).kid == KEY.kid


def test_signed_card_verifies_with_jwcrypto_and_inflates_with_zlib() -> None:
    payload = shc.card_payload(issuer="https://vrs.example/issuer", nbf=1638316800, bundle={"x": "ア"}, rid="abc")
    token = shc.sign(payload, KEY)
    verifier = jws.JWS()
    verifier.deserialize(token)
    verifier.verify(jwk.JWK(**KEY.public_jwk()), alg="ES256")
    header = verifier.jose_header
    assert header == {"alg": "ES256", "zip": "DEF", "kid": KEY.kid}
    # Raw DEFLATE: wbits -15 (no zlib header); minified JSON inside.
    raw = zlib.decompress(verifier.payload, -15)
    assert json.loads(raw) == payload
    assert b" " not in raw.replace("ア".encode(), b"")


def test_a_changed_byte_breaks_the_signature() -> None:
    token = shc.sign(shc.card_payload(issuer="https://i/issuer", nbf=1, bundle={}, rid="r"), KEY)
    header, body, signature = token.split(".")
    forged = f"{header}.{body[:-2]}{'A' if body[-2] != 'A' else 'B'}{body[-1]}.{signature}"
    assert shc.signature_holds(token, KEY.public)
    assert not shc.signature_holds(forged, KEY.public)


def test_rid_is_short_base64url_and_keyed() -> None:
    rid = shc.revocation_id(b"s" * 32, KEY.kid, "cert-1")
    assert len(rid) == 11 and set(rid) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert rid != shc.revocation_id(b"t" * 32, KEY.kid, "cert-1")
    assert rid != shc.revocation_id(b"s" * 32, KEY.kid, "cert-2")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("山田 花子", {"family": "山田", "given": ["花子"]}),
        ("山田\u3000花子", {"family": "山田", "given": ["花子"]}),
        ("  YAMADA  Hanako ", {"family": "YAMADA", "given": ["Hanako"]}),
        ("山田花子", {"family": "山田花子"}),
    ],
)
def test_names_split_family_first(name: str, expected: dict[str, object]) -> None:
    assert fhir.human_name(name) == expected


def test_every_product_has_a_cvx_code() -> None:
    assert set(default_rules().products) <= set(fhir.VACCINES)


def test_card_bundle_is_minimal() -> None:
    person = fhir.Person("131016", "A1", "山田 花子", "ヤマダ ハナコ", date(1950, 4, 2), "F")
    dose = fhir.Dose("d1", 1, date(2021, 6, 1), "moderna", "3001234", "千代田区役所", voided=False)
    bundle = fhir.card_bundle(person, [dose])
    assert bundle == {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "fullUrl": "resource:0",
                "resource": {
                    "resourceType": "Patient",
                    "name": [{"family": "山田", "given": ["花子"]}],
                    "birthDate": "1950-04-02",
                },
            },
            {
                "fullUrl": "resource:1",
                "resource": {
                    "resourceType": "Immunization",
                    "status": "completed",
                    "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "207"}]},
                    "patient": {"reference": "resource:0"},
                    "occurrenceDateTime": "2021-06-01",
                    "performer": [{"actor": {"display": "千代田区役所"}}],
                    "lotNumber": "3001234",
                },
            },
        ],
    }
