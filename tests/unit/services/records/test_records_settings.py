"""Records' settings: production refuses registry's development grant key, however the secret spells it."""

from __future__ import annotations

import json

import pytest
from jwcrypto import jwk
from pydantic import ValidationError

from services.records.settings import RecordsSettings
from shared.grants import DEV_PUBLIC_KEY

OTHER_PUBLIC_KEY = jwk.JWK.generate(kty="EC", crv="P-256").export_to_pem().decode()


@pytest.fixture(autouse=True)
def _production_gateway_key(monkeypatch: pytest.MonkeyPatch) -> None:
    key = jwk.JWK.generate(kty="EC", crv="P-256", kid="gw-prod", alg="ES256", use="sig")
    monkeypatch.setenv("VRS_AUTH_GATEWAY_JWKS", json.dumps({"keys": [key.export_public(as_dict=True)]}))


@pytest.mark.parametrize(
    ("key", "refused"),
    [
        (DEV_PUBLIC_KEY, True),
        (DEV_PUBLIC_KEY.strip(), True),
        (DEV_PUBLIC_KEY + "\n", True),
        (f"  {DEV_PUBLIC_KEY}  ", True),
        (OTHER_PUBLIC_KEY, False),
    ],
)
def test_production_refuses_the_development_grant_key(key: str, refused: bool) -> None:
    fields = {"VRS_ENVIRONMENT": "production", "transfer_grant_public_key": key}
    if refused:
        with pytest.raises(ValidationError, match="development transfer-grant key"):
            RecordsSettings.model_validate(fields)
    else:
        assert RecordsSettings.model_validate(fields).transfer_grant_public_key == key
