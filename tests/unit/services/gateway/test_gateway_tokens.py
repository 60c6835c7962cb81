"""Identity tokens at the gateway: only ES256/RS256 with a known kid, every claim checked; the attacks refused."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jws
from pydantic import ValidationError

from services.gateway import tokens
from services.gateway.settings import GatewaySettings
from services.gateway.tokens import IdentityVerifier, JwksSource, JwksUnavailable, sign_es256
from shared.auth import Principal, Role, TokenRules
from shared.dev_keys import DEV_AUDIT_KEY, DEV_IDENTITY_JWK, DEV_IDENTITY_KID, DEV_IDENTITY_PRIVATE_PEM, jwks_of
from shared.errors import ServiceUnavailable, Unauthorized

RULES = TokenRules(issuer="idp", audience="vrs-api", max_lifetime_seconds=3600, leeway_seconds=30)
CHIYODA = {"role": "municipality", "municipality": "131016", "sub": "clerk-1"}


def ec_key(kid: str) -> tuple[str, dict[str, Any]]:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = jwk.construct(pem, "ES256").public_key().to_dict()
    return pem, {**{k: public[k] for k in ("kty", "crv", "x", "y")}, "kid": kid, "alg": "ES256"}


def rsa_key(kid: str) -> tuple[str, dict[str, Any]]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = jwk.construct(pem, "RS256").public_key().to_dict()
    return pem, {**{k: public[k] for k in ("kty", "n", "e")}, "kid": kid, "alg": "RS256"}


KEY_A, JWK_A = ec_key("a")
KEY_B, JWK_B = ec_key("b")
RSA_KEY, RSA_JWK = rsa_key("r")


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "idp", "aud": "vrs-api", "iat": now, "exp": now + 600, **CHIYODA, **changes}


def token(key: str = KEY_A, kid: str = "a", alg: str = "ES256", **changes: Any) -> str:
    body = {k: v for k, v in claims(**changes).items() if v is not None}
    return str(jws.sign(json.dumps(body).encode(), key, headers={"kid": kid}, algorithm=alg))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Source:
    """A JWKS file the test rewrites, and the verifier reading it."""

    def __init__(self, tmp_path: Path, *keys: dict[str, Any]) -> None:
        self.path = tmp_path / "jwks.json"
        self.write(*keys)
        self.source = JwksSource(
            file=self.path,
            url=None,
            default=None,
            refuse_development_keys=True,
            refresh_seconds=3600,
            max_stale_seconds=3600,
            on_keys_removed=lambda kids: self.verifier.keys_removed(kids),
        )
        self.verifier = IdentityVerifier(self.source, RULES, cache_size=100, cache_seconds=300)

    def write(self, *keys: dict[str, Any]) -> None:
        self.path.write_text(json.dumps(jwks_of(*keys)))

    def principal(self, raw: str) -> Principal:
        return self.verifier.principal("Bearer " + raw)


@pytest.fixture
async def keys(tmp_path: Path) -> Source:
    source = Source(tmp_path, JWK_A, RSA_JWK)
    await source.source.refresh()
    return source


async def test_es256_and_rs256_tokens_with_a_known_kid_are_accepted(keys: Source) -> None:
    for raw in (token(), token(RSA_KEY, "r", "RS256")):
        principal = keys.principal(raw)
        assert (principal.role, principal.municipality, principal.subject) == (Role.MUNICIPALITY, "131016", "clerk-1")


def alg_none() -> str:
    return f"{b64(json.dumps({'alg': 'none', 'kid': 'a'}).encode())}.{b64(json.dumps(claims()).encode())}."


def hs256_keyed_with_the_public_key() -> str:
    public_pem = (
        serialization.load_pem_private_key(RSA_KEY.encode(), None)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    # By hand: python-jose itself refuses to sign this, which is the point of the attack.
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': 'r'}).encode())}.{b64(json.dumps(claims()).encode())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def tampered() -> str:
    header, _, signature = token().split(".")
    return f"{header}.{b64(json.dumps(claims(municipality='011002')).encode())}.{signature}"


def es256_key_used_as_rs256() -> str:
    return token(RSA_KEY, "a", "RS256")


ATTACKS = {
    "alg none": (alg_none, "algorithm must be ES256"),
    "HS256 keyed with the public key": (hs256_keyed_with_the_public_key, "algorithm must be RS256"),
    "a key used with another algorithm": (es256_key_used_as_rs256, "algorithm must be ES256"),
    "expired": (lambda: token(iat=int(time.time()) - 700, exp=int(time.time()) - 60), "expired"),
    "not yet valid (nbf)": (lambda: token(nbf=int(time.time()) + 120), "not yet valid"),
    "issued in the future": (lambda: token(iat=int(time.time()) + 120, exp=int(time.time()) + 600), "not yet valid"),
    "wrong audience": (lambda: token(aud="someone-else"), "wrong audience"),
    "no audience": (lambda: token(aud=None), "wrong audience"),
    "wrong issuer": (lambda: token(iss="evil"), "wrong issuer"),
    "unknown kid": (lambda: token(KEY_B, "b"), "unknown key id"),
    "no kid": (lambda: str(jws.sign(json.dumps(claims()).encode(), KEY_A, algorithm="ES256")), "no key id"),
    "tampered payload": (tampered, "bad signature"),
    "signed by another key under a known kid": (lambda: token(KEY_B, "a"), "bad signature"),
    "lifetime over the maximum": (lambda: token(exp=int(time.time()) + 3601), "lifetime over the maximum"),
    "no exp": (lambda: token(exp=None), "exp is required"),
    "no iat": (lambda: token(iat=None), "iat is required"),
    "anonymous role": (lambda: token(role="anonymous"), "anonymous is not a token role"),
    "unknown role": (lambda: token(role="service"), "unknown role"),
    "garbage": (lambda: "not.a.token", "malformed"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attacks_are_refused_in_our_own_words(keys: Source, attack: str) -> None:
    make, reason = ATTACKS[attack]
    with pytest.raises(Unauthorized) as refused:
        keys.principal(make())
    assert refused.value.detail == f"invalid token: {reason}" or reason in refused.value.detail
    assert len(keys.verifier.cache) == 0


async def test_a_rotated_out_key_stops_working_with_every_token_it_verified(keys: Source) -> None:
    raw = token()
    keys.principal(raw)
    assert len(keys.verifier.cache) == 1
    # Rollover: the new key is published beside the old one, then the old one leaves.
    keys.write(JWK_A, JWK_B, RSA_JWK)
    await keys.source.refresh()
    assert keys.principal(token(KEY_B, "b")).municipality == "131016"
    assert keys.principal(raw).municipality == "131016"  # both valid during the rollover
    keys.write(JWK_B, RSA_JWK)
    await keys.source.refresh()
    with pytest.raises(Unauthorized, match="unknown key id"):
        keys.principal(raw)  # the cached verification left with its key
    assert keys.principal(token(KEY_B, "b")).municipality == "131016"


async def test_an_unknown_kid_fetches_the_keys_again(keys: Source) -> None:
    keys.write(JWK_A, JWK_B, RSA_JWK)
    keys.source._last_attempt = 0.0  # as if the last refresh were long ago
    with pytest.raises(Unauthorized):
        keys.principal(token(KEY_B, "b"))
    assert keys.source._kick is not None
    await keys.source._kick
    assert keys.principal(token(KEY_B, "b")).municipality == "131016"


async def test_keys_too_long_unrefreshed_are_no_longer_trusted(keys: Source) -> None:
    keys.source.loaded_at -= 7200
    with pytest.raises(ServiceUnavailable):
        keys.principal(token())


@pytest.mark.parametrize(
    ("kind", "read_again", "trusted"),
    [
        # How `make run` starts: the built-in keys cannot change while the process runs, and nothing re-reads them.
        ("development", None, True),
        ("file", True, True),
        ("file", False, False),
        ("url", True, True),
        ("url", False, False),
    ],
)
async def test_only_keys_that_could_not_be_read_again_for_an_hour_stop_being_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, read_again: bool | None, trusted: bool
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_of(JWK_A)))
    source = JwksSource(
        file=path if kind == "file" else None,
        url="https://idp.example/jwks.json" if kind == "url" else None,
        default=jwks_of(DEV_IDENTITY_JWK),  # what development and test have, whatever else is configured
        refuse_development_keys=False,
        refresh_seconds=300,
        max_stale_seconds=3600,
    )

    async def fetch() -> dict[str, Any]:
        if not path.exists():
            raise JwksUnavailable("https://idp.example/jwks.json answered 503")
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc

    if kind == "url":
        monkeypatch.setattr(source, "_read", fetch)
    await source.start()
    try:
        verifier = IdentityVerifier(source, RULES, cache_size=0, cache_seconds=300)
        raw = "Bearer " + (token(DEV_IDENTITY_PRIVATE_PEM, DEV_IDENTITY_KID) if kind == "development" else token())
        assert verifier.principal(raw).subject == "clerk-1"
        later = time.monotonic() + 3601
        monkeypatch.setattr(tokens, "time", SimpleNamespace(monotonic=lambda: later, time=time.time))
        if read_again is False:
            path.unlink()
        if read_again is not None:  # what the refresh task has done meanwhile
            with contextlib.suppress(JwksUnavailable):
                await source.refresh()
        if trusted:
            assert verifier.principal(raw).subject == "clerk-1"
        else:
            with pytest.raises(ServiceUnavailable):
                verifier.principal(raw)
    finally:
        await source.stop()


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"keys": []}, "holds no usable signing key"),
        ({"keys": [DEV_IDENTITY_JWK]}, "development key"),
        ({"keys": [{**JWK_A, "kid": None}]}, "unusable"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}, "holds no usable signing key"),
        ({"keys": [{**RSA_JWK, "use": "enc", "alg": "RSA-OAEP"}]}, "holds no usable signing key"),
        ("not json", "unusable"),
    ],
)
async def test_an_unusable_jwks_stops_the_gateway(tmp_path: Path, document: Any, problem: str) -> None:
    source = Source(tmp_path, JWK_A)
    source.path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(JwksUnavailable, match=problem):
        await source.source.start()


async def test_a_jwks_url_that_does_not_answer_stops_the_gateway() -> None:
    source = JwksSource(
        file=None,
        url="https://127.0.0.1:9/jwks.json",
        default=None,
        refuse_development_keys=True,
        refresh_seconds=60,
        max_stale_seconds=60,
        fetch_timeout=1,
    )
    with pytest.raises(JwksUnavailable, match=r"127\.0\.0\.1:9"):
        await source.start()


# --- production refuses to start on development keys and unsafe settings ---


def production(monkeypatch: pytest.MonkeyPatch, **env: str) -> GatewaySettings:
    monkeypatch.setenv("VRS_ENVIRONMENT", "production")
    pem, public = ec_key("gw-prod")
    monkeypatch.setenv("VRS_AUTH_GATEWAY_JWKS", json.dumps(jwks_of(public)))
    defaults = {
        "VRS_GATEWAY_SIGNING_KEY": pem,
        "VRS_GATEWAY_SIGNING_KID": "gw-prod",
        "VRS_GATEWAY_AUDIT_KEY": "a-real-secret-of-at-least-32-characters",
        "VRS_GATEWAY_IDENTITY_JWKS_URL": "https://idp.example/jwks.json",
    }
    for name, value in {**defaults, **env}.items():
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    return GatewaySettings()


def test_a_complete_production_configuration_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert production(monkeypatch).environment == "production"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"VRS_GATEWAY_SIGNING_KEY": ""}, "SIGNING_KEY is the development key"),
        ({"VRS_GATEWAY_AUDIT_KEY": ""}, "AUDIT_KEY is the development key"),
        ({"VRS_GATEWAY_AUDIT_KEY": DEV_AUDIT_KEY}, "AUDIT_KEY is the development key"),
        ({"VRS_GATEWAY_AUDIT_KEY": DEV_AUDIT_KEY + "\n"}, "AUDIT_KEY is the development key"),
        ({"VRS_GATEWAY_AUDIT_KEY": "short"}, "shorter than 32"),
        ({"VRS_GATEWAY_IDENTITY_JWKS_URL": ""}, "exactly one of"),
        ({"VRS_GATEWAY_IDENTITY_JWKS_URL": "http://idp.example/jwks.json"}, "must be https"),
        ({"VRS_AUTH_GATEWAY_JWKS": json.dumps(jwks_of(DEV_IDENTITY_JWK))}, "development key"),
    ],
)
def test_production_refuses(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        production(monkeypatch, **env)


def test_a_deployment_must_name_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VRS_ENVIRONMENT", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(ValidationError, match="VRS_ENVIRONMENT must be set in a deployment"):
        GatewaySettings()
    monkeypatch.setenv("VRS_ENVIRONMENT", "test")
    assert GatewaySettings().environment == "test"


def test_sign_es256_is_what_the_verifier_reads(keys: Source) -> None:
    raw = sign_es256(KEY_A, "a", claims())
    assert keys.principal(raw).subject == "clerk-1"
