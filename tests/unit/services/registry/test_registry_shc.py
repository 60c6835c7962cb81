"""SMART Health Card encoding rules, checked against the spec's examples and an independent JOSE library."""

from __future__ import annotations

import json
import zlib
from datetime import date, timedelta

import pytest
from jwcrypto import jwk, jws

from services.registry import certificates, fhir, qr, shc
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


# The longest values records and registry accept — a 100-character name, 30-character venues, 20-character
# lots — made of characters that never repeat, so that DEFLATE finds nothing to shorten.
LONGEST_NAME = "".join(chr(0x4E00 + 7 * i) for i in range(49)) + " " + "".join(chr(0x5200 + 7 * i) for i in range(50))
ALPHANUMERIC = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def longest_venue(i: int) -> str:
    return "".join(chr(0x6000 + 11 * (30 * i + j)) for j in range(30))


def longest_lot(i: int) -> str:
    return "".join(ALPHANUMERIC[(7 * i + 13 * j + j * j) % 36] for j in range(20))


def card_of(n: int, *, name: str = LONGEST_NAME) -> tuple[str, list[fhir.Dose]]:
    person = fhir.Person("131016", "A1", name, "ヤマダ ハナコ", date(1950, 4, 2), "F")
    doses = [
        fhir.Dose(
            f"{i:08d}-0000-4000-8000-000000000000",
            i + 1,
            date(2021, 6, 1) + timedelta(days=120 * i),
            ("pfizer", "moderna", "novavax")[i % 3],
            longest_lot(i),
            longest_venue(i),
            voided=False,
        )
        for i in range(n)
    ]
    return certificates.signed_card(
        KEY, issuer="https://vrs.example.jp/issuer", nbf=1733900000, rid="M-EyzklSfdI", person=person, doses=doses
    )


@pytest.mark.parametrize("n", range(1, 11))
def test_a_card_always_fits_one_version_22_qr_code(n: int) -> None:
    jws_text, shown = card_of(n)
    assert len(jws_text) <= shc.MAX_SINGLE_QR_JWS
    assert qr_version(shc.to_numeric(jws_text)) <= 22
    payload = json.loads(zlib.decompress(shc.b64url_decode(jws_text.split(".")[1]), -15))
    shots = [e["resource"] for e in payload["vc"]["credentialSubject"]["fhirBundle"]["entry"][1:]]
    # What is left out, oldest first: never the name, birth date, a shown dose's date, product or lot.
    assert payload["vc"]["credentialSubject"]["fhirBundle"]["entry"][0]["resource"]["name"] == [
        fhir.human_name(LONGEST_NAME)
    ]
    assert [s["lotNumber"] for s in shots] == [d.lot_number for d in shown]
    assert [s["occurrenceDateTime"] for s in shots] == [d.vaccinated_on.isoformat() for d in shown]
    assert shown and shown[-1].dose_number == n  # the latest doses are the ones kept


def test_what_a_card_leaves_out_comes_in_a_fixed_order() -> None:
    # Short values: everything fits.
    jws_text, shown = card_of(2, name="山田 花子")
    assert len(shown) == 2 and all("performer" in s for s in _shots(jws_text))
    # Too long with venues: the venues go, every dose stays.
    jws_text, shown = card_of(5, name="山田 花子")
    assert len(shown) == 5 and not any("performer" in s for s in _shots(jws_text))
    # Too long even without venues: the oldest doses go too.
    jws_text, shown = card_of(10)
    assert 1 <= len(shown) < 10 and [d.dose_number for d in shown] == list(range(11 - len(shown), 11))
    assert not any("performer" in s for s in _shots(jws_text))


def test_the_same_doses_give_the_same_card_byte_for_byte() -> None:
    assert card_of(10) == card_of(10)


def qr_version(shc_text: str) -> int:
    modules = qr.qr_image(shc_text, box_size=1).size[0] - 2 * 4  # less the 4-module quiet zone
    return (modules - 17) // 4


def test_a_qr_code_is_never_grown_past_version_22() -> None:
    longest = "eyJ" + "A" * (shc.MAX_SINGLE_QR_JWS - 3)
    assert qr_version(shc.to_numeric(longest)) == 22
    with pytest.raises(ValueError, match="version-22"):
        qr.qr_image(shc.to_numeric(longest + "A"))


def _shots(jws_text: str) -> list[dict[str, object]]:
    payload = json.loads(zlib.decompress(shc.b64url_decode(jws_text.split(".")[1]), -15))
    return [e["resource"] for e in payload["vc"]["credentialSubject"]["fhirBundle"]["entry"][1:]]
