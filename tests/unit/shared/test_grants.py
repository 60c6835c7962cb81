"""Registry's grants: each kind opens only with registry's key, for its own audience, before it expires."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jwt
from pydantic import ValidationError

from shared.grants import (
    DEV_PRIVATE_KEY,
    DEV_PUBLIC_KEY,
    DoseVersionGrant,
    InvalidGrant,
    TransferGrant,
    open_grant,
    sign_grant,
    verify_grant,
)

CHIYODA, SAPPORO = "131016", "011002"
CHECK = DoseVersionGrant.model_validate(
    {
        "certificates": [
            {"certificate": "c1", "municipality": CHIYODA, "doses": ["d1", "d2"]},
            {"certificate": "c2", "municipality": SAPPORO, "doses": ["d3"]},
        ]
    }
)
TRANSFER = TransferGrant(caller=CHIYODA, legal_basis=["consent"], municipality=SAPPORO, coupons=["0000000001"])


def other_key() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.decode()


def test_a_dose_version_grant_names_each_dose_with_its_municipality_and_lives_seconds() -> None:
    token = sign_grant(DEV_PRIVATE_KEY, CHECK)
    opened = open_grant(DEV_PUBLIC_KEY, token, DoseVersionGrant)
    assert opened.dose_ids() == {"d1": CHIYODA, "d2": CHIYODA, "d3": SAPPORO}
    claims = jwt.get_unverified_claims(token)
    assert claims["aud"] == "vrs-records/dose-versions" and claims["exp"] - claims["iat"] == 15


@pytest.mark.parametrize(
    ("token", "kind"),
    [
        (lambda: sign_grant(DEV_PRIVATE_KEY, CHECK, lifetime=timedelta(seconds=-1)), DoseVersionGrant),  # expired
        (lambda: sign_grant(other_key(), CHECK), DoseVersionGrant),  # not registry's key
        (lambda: sign_grant(DEV_PRIVATE_KEY, TRANSFER), DoseVersionGrant),  # another kind, another audience
        (lambda: sign_grant(DEV_PRIVATE_KEY, CHECK), TransferGrant),
        (lambda: "not.a.grant", DoseVersionGrant),
    ],
    ids=["expired", "foreign-key", "transfer-as-check", "check-as-transfer", "garbage"],
)
def test_refused(token: object, kind: type[DoseVersionGrant] | type[TransferGrant]) -> None:
    with pytest.raises(InvalidGrant):
        open_grant(DEV_PUBLIC_KEY, token(), kind)  # type: ignore[operator]


def test_a_transfer_grant_still_opens_only_for_its_caller() -> None:
    token = sign_grant(DEV_PRIVATE_KEY, TRANSFER)
    assert verify_grant(DEV_PUBLIC_KEY, token, caller=CHIYODA).coupons == ["0000000001"]
    with pytest.raises(InvalidGrant, match="another municipality"):
        verify_grant(DEV_PUBLIC_KEY, token, caller=SAPPORO)


@pytest.mark.parametrize(
    "certificates",
    [
        [],
        [{"certificate": "c1", "municipality": "13101", "doses": ["d1"]}],
        [{"certificate": "c1", "municipality": CHIYODA, "doses": []}],
    ],
    ids=["no-certificate", "bad-municipality", "no-dose"],
)
def test_a_grant_must_name_something_precise(certificates: list[dict[str, object]]) -> None:
    with pytest.raises(ValidationError):
        DoseVersionGrant.model_validate({"certificates": certificates})
