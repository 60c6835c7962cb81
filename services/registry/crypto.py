"""My Number at rest: AES-256-GCM with key ids (rotation) and an HMAC keyed hash for look-ups.

The plain number exists only in memory for the length of a request; what is stored is the ciphertext, the
key id, the last four digits (for masking) and the keyed hash (for the directory).
"""

from __future__ import annotations

import base64
import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.registry.settings import RegistrySettings


@dataclass(frozen=True, slots=True)
class SealedMyNumber:
    key_id: str
    ciphertext: bytes  # 12-byte nonce + ciphertext + tag
    keyed_hash: bytes
    last4: str


# What a vault is made of, picklable: (key id → base64 key, the active key id, the base64 HMAC key). A bulk
# import's worker processes build their own vault from it.
VaultKeys = tuple[dict[str, str], str, str]


class MyNumberVault:
    def __init__(self, settings: RegistrySettings) -> None:
        self._material: VaultKeys = (
            dict(settings.my_number_keys),
            settings.my_number_active_key,
            settings.my_number_hash_key,
        )
        self._keys = {kid: AESGCM(base64.b64decode(key)) for kid, key in settings.my_number_keys.items()}
        self._active = settings.my_number_active_key
        self._hash_key = base64.b64decode(settings.my_number_hash_key)

    @classmethod
    def from_keys(cls, keys: VaultKeys) -> MyNumberVault:
        vault = cls.__new__(cls)
        vault._material = keys
        vault._keys = {kid: AESGCM(base64.b64decode(key)) for kid, key in keys[0].items()}
        vault._active, vault._hash_key = keys[1], base64.b64decode(keys[2])
        return vault

    @property
    def keys(self) -> VaultKeys:
        return self._material

    def keyed_hash(self, my_number: str) -> bytes:
        # hmac.digest: OpenSSL's one-shot HMAC, several times faster than building an hmac object per number.
        return hmac.digest(self._hash_key, my_number.encode(), "sha256")

    def seal(self, my_number: str, *, context: str, keyed_hash: bytes | None = None) -> SealedMyNumber:
        """``context`` (the resident's key) is bound as associated data: a ciphertext cannot be moved.
        ``keyed_hash``: this number's, if the caller computed it already."""
        nonce = os.urandom(12)
        ciphertext = self._keys[self._active].encrypt(nonce, my_number.encode(), context.encode())
        return SealedMyNumber(
            key_id=self._active,
            ciphertext=nonce + ciphertext,
            keyed_hash=self.keyed_hash(my_number) if keyed_hash is None else keyed_hash,
            last4=my_number[-4:],
        )

    def seal_many(self, items: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
        """(ciphertext, keyed hash) under the active key for each (My Number, context), as :meth:`seal` makes
        them; one call to the random source for every nonce."""
        aead, digest, hash_key = self._keys[self._active], hmac.digest, self._hash_key
        nonces = os.urandom(12 * len(items))
        out = []
        for i, (number, context) in enumerate(items):
            nonce, plain = nonces[12 * i : 12 * i + 12], number.encode()
            out.append((nonce + aead.encrypt(nonce, plain, context.encode()), digest(hash_key, plain, "sha256")))
        return out

    @property
    def active_key(self) -> str:
        return self._active

    def reseal(self, key_id: str, blob: bytes, *, context: str) -> tuple[str, bytes]:
        """(active key id, ciphertext under it) for a number sealed under ``key_id``; the hash is unchanged."""
        nonce = os.urandom(12)
        plain = self._keys[key_id].decrypt(blob[:12], blob[12:], context.encode())
        return self._active, nonce + self._keys[self._active].encrypt(nonce, plain, context.encode())

    def open(self, key_id: str, blob: bytes, *, context: str) -> str:
        return self._keys[key_id].decrypt(blob[:12], blob[12:], context.encode()).decode()
