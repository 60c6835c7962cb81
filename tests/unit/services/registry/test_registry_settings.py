"""The card issuer's settings: development keys refused in production, an issuer URL verifiers can use."""

from __future__ import annotations

import base64
import json

import pytest
from jwcrypto import jwk

from services.registry.settings import (
    DEV_MY_NUMBER_HASH_KEY,
    DEV_MY_NUMBER_KEY,
    DEV_SHC_PRIVATE_KEY,
    DEV_SHC_RID_SECRET,
    RegistrySettings,
)
from shared.grants import DEV_PRIVATE_KEY

SECRET = base64.b64encode(b"p" * 32).decode()
PROD_KEYS = {
    "my_number_keys": {"k1": base64.b64encode(b"k" * 32).decode()},
    "my_number_active_key": "k1",
    "my_number_hash_key": base64.b64encode(b"h" * 32).decode(),
}


@pytest.fixture(autouse=True)
def _production_gateway_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Production also refuses the development gateway key that services verify internal tokens with.
    key = jwk.JWK.generate(kty="EC", crv="P-256", kid="gw-prod", alg="ES256", use="sig")
    monkeypatch.setenv("VRS_AUTH_GATEWAY_JWKS", json.dumps({"keys": [key.export_public(as_dict=True)]}))


def production(**changes: object) -> RegistrySettings:
    fields: dict[str, object] = {
        "VRS_ENVIRONMENT": "production",  # the field is read under its environment name
        **PROD_KEYS,
        "shc_issuer": "https://vrs.example.jp/issuer",
        "shc_private_key": jwk.JWK.generate(kty="EC", crv="P-256")
        .export_to_pem(private_key=True, password=None)
        .decode(),
        "shc_rid_secret": SECRET,
        "transfer_grant_private_key": jwk.JWK.generate(kty="EC", crv="P-256")
        .export_to_pem(private_key=True, password=None)
        .decode(),
    }
    fields.update(changes)
    return RegistrySettings.model_validate(fields)


def test_production_with_its_own_key_and_secret() -> None:
    assert production().shc_issuer == "https://vrs.example.jp/issuer"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shc_private_key": DEV_SHC_PRIVATE_KEY}, "development SMART Health Card key"),
        # The development key given as a JWK is still the development key.
        ({"shc_private_key": jwk.JWK.from_pem(DEV_SHC_PRIVATE_KEY.encode()).export_private()}, "development"),
        ({"shc_rid_secret": base64.b64encode(b"vrs-dev-shc-revocation-id-secret").decode()}, "development"),
        # Secrets mounted from files end in a newline: the development key with one is still that key.
        ({"my_number_keys": {"k1": DEV_MY_NUMBER_KEY + "\n"}}, "development My Number keys"),
        ({"my_number_hash_key": DEV_MY_NUMBER_HASH_KEY + "\n"}, "development My Number keys"),
        ({"shc_rid_secret": DEV_SHC_RID_SECRET + "\n"}, "development"),
        ({"transfer_grant_private_key": DEV_PRIVATE_KEY.strip()}, "development transfer-grant key"),
        ({"transfer_grant_private_key": f"  {DEV_PRIVATE_KEY}  "}, "development transfer-grant key"),
        ({"shc_issuer": "http://vrs.example.jp/issuer"}, "https"),
        ({"shc_issuer": "https://vrs.example.jp/shc"}, "path is /issuer"),
        ({"shc_issuer": "https://vrs.example.jp/issuer/"}, "path is /issuer"),
        ({"shc_private_key": "not a key"}, "SHC_PRIVATE_KEY"),
        ({"shc_private_key": jwk.JWK.generate(kty="EC", crv="P-384").export_to_pem(True, None).decode()}, "P-256"),
        ({"shc_rid_secret": base64.b64encode(b"short").decode()}, "32 bytes"),
        ({"shc_retired_public_keys": ['{"kty": "EC", "crv": "P-256"}']}, r"RETIRED_PUBLIC_KEYS\[0\]"),
        ({"shc_retired_public_keys": ["-----BEGIN PUBLIC KEY-----"]}, r"RETIRED_PUBLIC_KEYS\[0\]"),
    ],
)
def test_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        production(**changes)


def test_the_disclosure_log_is_kept_seven_years_at_least() -> None:
    assert RegistrySettings().disclosure_keep_years == 7
    assert RegistrySettings(disclosure_keep_years=10).disclosure_keep_years == 10
    with pytest.raises(ValueError, match="disclosure_keep_years"):
        RegistrySettings(disclosure_keep_years=6)
