"""The vault's keyed hash (services/registry/crypto.py) is HMAC-SHA256 exactly: the directory's entries written
before it was computed from prepared key blocks must still be found."""

from __future__ import annotations

import base64
import hmac

import pytest
from cryptography.exceptions import InvalidTag

from services.registry.crypto import KeyedSha256, MyNumberVault
from services.registry.settings import RegistrySettings


@pytest.mark.parametrize("size", [0, 1, 32, 63, 64, 65, 200])  # SHA-256's block is 64 bytes; longer keys are hashed
@pytest.mark.parametrize("message", [b"", b"123456789018", b"x" * 64, b"y" * 1000])
def test_keyed_sha256_is_hmac_sha256(size: int, message: bytes) -> None:
    key = bytes((7 * i + 3) % 256 for i in range(size))
    assert KeyedSha256(key).digest(message) == hmac.digest(key, message, "sha256")


def test_a_digest_leaves_the_prepared_state_unchanged() -> None:
    keyed = KeyedSha256(b"k" * 32)
    first = keyed.digest(b"123456789018")
    keyed.digest(b"999999999996")
    assert keyed.digest(b"123456789018") == first


def test_the_vault_hashes_and_seals_with_the_configured_hash_key() -> None:
    settings = RegistrySettings()
    vault = MyNumberVault(settings)
    expected = hmac.digest(base64.b64decode(settings.my_number_hash_key), b"123456789018", "sha256")
    assert vault.keyed_hash("123456789018") == expected
    [(ciphertext, keyed_hash)] = vault.seal_many([("123456789018", "131016/R1")])
    assert keyed_hash == expected
    assert vault.open(vault.active_key, ciphertext, context="131016/R1") == "123456789018"
    assert MyNumberVault.from_keys(vault.keys).keyed_hash("123456789018") == expected


def test_sealed_bytes_open_only_under_their_key_and_context() -> None:
    # An uploaded file's pieces: a piece cannot be read in another import or at another place in the file.
    vault = MyNumberVault(RegistrySettings())
    key_id, sealed = vault.seal_bytes(b"000123,123456789018\n", context="import/i1/0")
    assert key_id == vault.active_key and b"123456789018" not in sealed
    assert vault.open_bytes(key_id, sealed, context="import/i1/0") == b"000123,123456789018\n"
    with pytest.raises(InvalidTag):
        vault.open_bytes(key_id, sealed, context="import/i1/1")
