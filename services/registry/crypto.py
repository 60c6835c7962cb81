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


class MyNumberVault:
    def __init__(self, settings: RegistrySettings) -> None:
        self._keys = {kid: AESGCM(base64.b64decode(key)) for kid, key in settings.my_number_keys.items()}
        self._active = settings.my_number_active_key
        self._hash_key = base64.b64decode(settings.my_number_hash_key)

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
