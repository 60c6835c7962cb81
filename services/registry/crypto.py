"""My Number at rest: AES-256-GCM with key ids (rotation) and an HMAC keyed hash for look-ups.

The plain number exists only in memory for the length of a request; what is stored is the ciphertext, the
key id, the last four digits (for masking) and the keyed hash (for the directory).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    # Not at run time: a bulk import's worker process imports this module, and the settings bring in the
    # whole web and database stack (half a second of CPU, a second and more on a busy machine, per worker).
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


class KeyedSha256:
    """HMAC-SHA256 under one key (RFC 2104), its two padded key blocks hashed once: a digest is then two copies
    of a hash state and two short updates. ``hmac.digest`` sets the key up again at every call: 2.4-3.2 µs a
    number here against 0.7 µs, the largest single cost of a resident in a bulk import."""

    _BLOCK = 64  # SHA-256's block size in bytes

    def __init__(self, key: bytes) -> None:
        if len(key) > self._BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(self._BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class MyNumberVault:
    def __init__(self, settings: RegistrySettings) -> None:
        self._material: VaultKeys = (
            dict(settings.my_number_keys),
            settings.my_number_active_key,
            settings.my_number_hash_key,
        )
        self._keys = {kid: AESGCM(base64.b64decode(key)) for kid, key in settings.my_number_keys.items()}
        self._active = settings.my_number_active_key
        self._hmac = KeyedSha256(base64.b64decode(settings.my_number_hash_key))

    @classmethod
    def from_keys(cls, keys: VaultKeys) -> MyNumberVault:
        vault = cls.__new__(cls)
        vault._material = keys
        vault._keys = {kid: AESGCM(base64.b64decode(key)) for kid, key in keys[0].items()}
        vault._active, vault._hmac = keys[1], KeyedSha256(base64.b64decode(keys[2]))
        return vault

    @property
    def keys(self) -> VaultKeys:
        return self._material

    def keyed_hash(self, my_number: str) -> bytes:
        return self._hmac.digest(my_number.encode())

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
        aead, digest = self._keys[self._active], self._hmac.digest
        nonces = os.urandom(12 * len(items))
        out = []
        for i, (number, context) in enumerate(items):
            nonce, plain = nonces[12 * i : 12 * i + 12], number.encode()
            out.append((nonce + aead.encrypt(nonce, plain, context.encode()), digest(plain)))
        return out

    @property
    def active_key(self) -> str:
        return self._active

    def reseal(self, key_id: str, blob: bytes, *, context: str) -> tuple[str, bytes]:
        """(active key id, ciphertext under it) for data sealed under ``key_id``; a number's hash is unchanged."""
        return self.seal_bytes(self.open_bytes(key_id, blob, context=context), context=context)

    def open(self, key_id: str, blob: bytes, *, context: str) -> str:
        return self.open_bytes(key_id, blob, context=context).decode()

    def seal_bytes(self, plain: bytes, *, context: str) -> tuple[str, bytes]:
        """(active key id, nonce + ciphertext + tag): what else holds My Numbers (an uploaded resident CSV) is
        sealed as the numbers are, ``context`` bound as associated data."""
        nonce = os.urandom(12)
        return self._active, nonce + self._keys[self._active].encrypt(nonce, plain, context.encode())

    def open_bytes(self, key_id: str, blob: bytes, *, context: str) -> bytes:
        return self._keys[key_id].decrypt(blob[:12], blob[12:], context.encode())
