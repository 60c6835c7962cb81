"""DEVELOPMENT-ONLY keys, committed on purpose so that ``make run``, the tests and ``vrs token`` work out of the box.

Everyone who has read this repository holds these private keys, so nothing signed with them proves anything:
every production check (``VRS_ENVIRONMENT=production``) refuses to start when any of them is configured —
see :func:`is_development_jwk`, :func:`is_development_key` and the settings validators. Production keys come from
secrets, never from here.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from jose import jwk

# Signs the callers' identity tokens in development (``vrs token``): stands in for the identity provider.
DEV_IDENTITY_KID = "vrs-dev-identity-DEVELOPMENT-ONLY"
DEV_IDENTITY_PRIVATE_PEM = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgRZjtSHIC5I+nC/eR
wUSY3g3MInPglkEbNwXA4kTUu1OhRANCAARDix/OjTD4ZCHtTxPKNLwBT6/1NNJr
pkbOI2LfV207Vrafa3JVNp4wJqTo53AqgZPOX6dRaoJ5AAFfBou1eVqi
-----END PRIVATE KEY-----
"""

# Signs the gateway's internal tokens (what the services trust) in development.
DEV_GATEWAY_KID = "vrs-dev-gateway-DEVELOPMENT-ONLY"
DEV_GATEWAY_PRIVATE_PEM = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgTooK59oJqsexO4fw
FRqUdMKY4LNd8F/BelHIb0G2j7ahRANCAASJOS8r0URQXkbiDe1PAYqmYzjQq6kZ
YfZ2V1HoKF1KE3mpw/RpQHGQrLg8QC304LYE0rE8YL7X1s72c/HNBCgd
-----END PRIVATE KEY-----
"""

# Keys the audit trail's MACs in development.
DEV_AUDIT_KEY = "vrs-dev-audit-key-DEVELOPMENT-ONLY-zXKLVyRVBP_EX0FkTrNMNzmdS9i3J4wvbX059tProAo"


def public_jwk(private_pem: str, kid: str) -> dict[str, Any]:
    """The public half of an EC P-256 private key as a JWK (``kid``, ``alg`` ES256, ``use`` sig)."""
    public = jwk.construct(private_pem, "ES256").public_key().to_dict()
    material = {k: v for k, v in public.items() if k in ("kty", "crv", "x", "y")}
    return {**material, "kid": kid, "alg": "ES256", "use": "sig"}


def jwks_of(*keys: Mapping[str, Any]) -> dict[str, Any]:
    return {"keys": [dict(k) for k in keys]}


DEV_IDENTITY_JWK = public_jwk(DEV_IDENTITY_PRIVATE_PEM, DEV_IDENTITY_KID)
DEV_GATEWAY_JWK = public_jwk(DEV_GATEWAY_PRIVATE_PEM, DEV_GATEWAY_KID)
# The key material itself, whatever kid a copy is published under.
_DEV_MATERIAL = frozenset((k["x"], k["y"]) for k in (DEV_IDENTITY_JWK, DEV_GATEWAY_JWK))


def is_development_jwk(key: Mapping[str, Any]) -> bool:
    return (key.get("x"), key.get("y")) in _DEV_MATERIAL or key.get("kid") in (DEV_IDENTITY_KID, DEV_GATEWAY_KID)


def is_development_private_pem(pem: str) -> bool:
    try:
        return is_development_jwk(public_jwk(pem, ""))
    except Exception:
        return False


def key_material(key: str) -> bytes:
    """What a configured key is, whatever its spelling, for comparing it with a development key.

    Secrets mounted from files often end in a newline, and base64 decoding ignores it, so text comparison
    would let the development key through with a newline, spaces or another PEM wrapping. A PEM key is its
    public half (DER: a private key and its public key are the same material); a base64 secret is its bytes;
    anything else is its text without whitespace.
    """
    text = "".join(key.split())
    if "-----BEGIN" in key:
        try:
            return _public_der(key.strip().encode())
        except (ValueError, TypeError):
            return text.encode()  # not a key at all: the service's own parsing says why
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        return text.encode()


def is_development_key(configured: str, development: str) -> bool:
    """Whether ``configured`` holds the same key material as ``development`` (see :func:`key_material`)."""
    return key_material(configured) == key_material(development)


def _public_der(pem: bytes) -> bytes:
    if b"PRIVATE KEY" in pem:
        public = serialization.load_pem_private_key(pem, password=None).public_key()
    else:
        public = serialization.load_pem_public_key(pem)
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
