"""Development keys are recognised by their material, not their spelling: production must refuse them all."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from jwcrypto import jwk

from services.registry.settings import DEV_MY_NUMBER_HASH_KEY, DEV_MY_NUMBER_KEY, DEV_SHC_RID_SECRET
from shared.dev_keys import DEV_AUDIT_KEY, is_development_key
from shared.grants import DEV_PRIVATE_KEY, DEV_PUBLIC_KEY

OTHER_SECRET = base64.b64encode(b"o" * 32).decode()
OTHER_PEM = jwk.JWK.generate(kty="EC", crv="P-256").export_to_pem(private_key=True, password=None).decode()
DEVELOPMENT = [
    DEV_MY_NUMBER_KEY,
    DEV_MY_NUMBER_HASH_KEY,
    DEV_SHC_RID_SECRET,
    DEV_AUDIT_KEY,
    DEV_PRIVATE_KEY,
    DEV_PUBLIC_KEY,
]


@pytest.mark.parametrize("development", DEVELOPMENT)
@pytest.mark.parametrize(
    ("spell", "refused"),
    [
        (lambda key: key, True),
        (lambda key: key.strip() + "\n", True),  # a secret mounted from a file
        (lambda key: key.strip(), True),
        (lambda key: f"  {key.strip()}  ", True),
        (lambda key: f"\n{key}\r\n", True),
        (lambda key: OTHER_PEM if "-----BEGIN" in key else OTHER_SECRET, False),
    ],
    ids=["exact", "trailing newline", "stripped", "surrounding spaces", "crlf", "a different key"],
)
def test_a_development_key_however_spelled(development: str, spell: Callable[[str], str], refused: bool) -> None:
    assert is_development_key(spell(development), development) is refused


@pytest.mark.parametrize(
    ("configured", "development", "refused"),
    [
        # A private key and its public half are the same material.
        (DEV_PRIVATE_KEY, DEV_PUBLIC_KEY, True),
        (DEV_PUBLIC_KEY, DEV_PRIVATE_KEY, True),
        (OTHER_PEM, DEV_PUBLIC_KEY, False),
        # One byte of the secret changed is another key; text that is no key is not the development key.
        (base64.b64encode(b"vrs-dev-my-number-aes-key-32bytf").decode(), DEV_MY_NUMBER_KEY, False),
        ("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n", DEV_PRIVATE_KEY, False),
        (DEV_AUDIT_KEY + "x", DEV_AUDIT_KEY, False),
    ],
)
def test_key_material(configured: str, development: str, refused: bool) -> None:
    assert is_development_key(configured, development) is refused
