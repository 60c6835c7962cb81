"""A JWKS as identity providers publish it: signing keys beside encryption keys and key types we do not use."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jws
from pydantic import ValidationError

from shared.auth import Keyset, TokenRules, verify_jwt
from shared.dev_keys import DEV_IDENTITY_PRIVATE_PEM, jwks_of, public_jwk
from shared.settings import AuthSettings

RULES = TokenRules(issuer="idp", audience="vrs-api", max_lifetime_seconds=3600, leeway_seconds=30)
SIGNING = public_jwk(DEV_IDENTITY_PRIVATE_PEM, "sig-1")


def public(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, alg: str) -> dict[str, Any]:
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key: dict[str, Any] = jwk.construct(pem, alg).public_key().to_dict()
    return key


_RSA = public(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
_P256 = public(ec.generate_private_key(ec.SECP256R1()), "ES256")
_P384 = public(ec.generate_private_key(ec.SECP384R1()), "ES384")
MATERIAL = ("n", "x", "y", "k")

# Keys published beside the signing keys that no token we accept is signed with.
NOT_FOR_US: dict[str, dict[str, Any]] = {
    "an RSA encryption key (Keycloak's RSA-OAEP)": {**_RSA, "use": "enc", "alg": "RSA-OAEP"},
    "an EC encryption key": {**_P256, "use": "enc", "alg": "ECDH-ES"},
    "an RSA key for PS256": {**_RSA, "use": "sig", "alg": "PS256"},
    "an EC P-384 key": {**_P384, "alg": "ES384"},
    "an EC P-384 key without alg": {k: v for k, v in _P384.items() if k != "alg"},
    "an Ed25519 key": {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
    "a symmetric key": {"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ", "alg": "HS256"},
}


def signed_token() -> str:
    now = int(time.time())
    claims = {"iss": "idp", "aud": "vrs-api", "iat": now, "exp": now + 600, "sub": "clerk-1", "role": "national"}
    return str(jws.sign(json.dumps(claims).encode(), DEV_IDENTITY_PRIVATE_PEM, {"kid": "sig-1"}, algorithm="ES256"))


@pytest.mark.parametrize("other", list(NOT_FOR_US))
def test_a_key_not_for_verifying_our_tokens_is_skipped_with_one_warning_by_kid(
    other: str, caplog: pytest.LogCaptureFixture
) -> None:
    document = jwks_of(SIGNING, {**NOT_FOR_US[other], "kid": other})
    with caplog.at_level(logging.WARNING, logger="shared.auth"):
        # The gateway reads its identity provider's JWKS again every few minutes.
        keysets = [Keyset.from_jwks(document) for _ in range(3)]
    assert [keyset.kids for keyset in keysets] == [{"sig-1"}] * 3
    assert verify_jwt(signed_token(), keysets[-1], RULES)[1] == "sig-1"
    warnings = [r.getMessage() for r in caplog.records if r.name == "shared.auth"]
    assert len(warnings) == 1 and other in warnings[0]
    assert not [m for m in MATERIAL if m in NOT_FOR_US[other] and NOT_FOR_US[other][m] in warnings[0]]


@pytest.mark.parametrize("other", list(NOT_FOR_US))
def test_a_jwks_with_no_key_to_verify_tokens_with_is_refused(other: str) -> None:
    document = json.dumps(jwks_of({**NOT_FOR_US[other], "kid": other}))
    assert len(Keyset.from_jwks(document)) == 0
    with pytest.raises(ValidationError, match="holds no usable signing key"):
        AuthSettings(gateway_jwks=document)
