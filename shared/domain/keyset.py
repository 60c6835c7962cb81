"""A compact set of 64-bit keys, for noticing a key seen earlier in a file of millions of rows.

A Python ``set`` of ints costs about 70 bytes a key (the int object and a sparse slot); a resident file of
3 million rows with three keys each would hold ~600 MB just to find repeats, more than the file itself.
This flat open-addressing table costs 16-32 bytes a key, at about a microsecond an ``add``.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from hashlib import blake2b

_MASK_64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads sequential ids over the table
_MIN_BITS = 10
_BAD_KEY = "a key is a non-zero 64-bit unsigned int"


class KeySet:
    """Non-zero ints below 2**64; :meth:`add` says whether the key is new."""

    def __init__(self, expected: int = 0) -> None:
        # Sized for ``expected`` keys at once: growing by doubling re-places every key each time (in Python).
        self._bits = max(_MIN_BITS, (2 * expected - 1).bit_length())
        self._slots = array("Q", bytes(8 << self._bits))
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: int) -> bool:
        slots, shift, mask = self._slots, 64 - self._bits, (1 << self._bits) - 1
        i = ((key * _GOLDEN) & _MASK_64) >> shift
        while (value := slots[i]) != 0:
            if value == key:
                return True
            i = (i + 1) & mask
        return False

    def add(self, key: int) -> bool:
        """Add ``key``; True when it was not there before."""
        if not key:
            raise ValueError(_BAD_KEY)
        return not self.add_many((key,))

    def add_many(self, keys: Sequence[int]) -> list[int]:
        """Add each key in order, 0 skipped (no key); the positions of the keys that were there already (an
        earlier one, or one earlier in ``keys``). One loop for a chunk of rows: a call per key was a third of a
        bulk import's main process."""
        repeats = []
        slots, bits = self._slots, self._bits
        shift, mask, limit = 64 - bits, (1 << bits) - 1, len(slots) // 2
        size = self._size
        for position, key in enumerate(keys):
            if not key:
                continue
            if not 0 < key <= _MASK_64:
                raise ValueError(_BAD_KEY)
            i = ((key * _GOLDEN) & _MASK_64) >> shift
            while (value := slots[i]) != 0:
                if value == key:
                    repeats.append(position)
                    break
                i = (i + 1) & mask
            else:
                slots[i] = key
                size += 1
                if size > limit:
                    self._size = size
                    self._grow()
                    slots, bits = self._slots, self._bits
                    shift, mask, limit = 64 - bits, (1 << bits) - 1, len(slots) // 2
        self._size = size
        return repeats

    def _grow(self) -> None:
        # The keys are known distinct and valid: placed without add()'s checks (growing was 40 % of a
        # million-row import's repeat checks when it went through add()).
        old = self._slots
        self._bits += 1
        slots = self._slots = array("Q", bytes(8 << self._bits))
        shift, mask = 64 - self._bits, (1 << self._bits) - 1
        for key in old:
            if key:
                i = ((key * _GOLDEN) & _MASK_64) >> shift
                while slots[i]:
                    i = (i + 1) & mask
                slots[i] = key


def text_key(value: str) -> int:
    """A non-zero 64-bit key for an identifier: exact for up to 17 ASCII digits (leading zeros kept apart:
    ``012`` is not ``12``), a 63-bit hash otherwise (two different ids collide with odds ~1e-6 in a file of
    3 million non-numeric ids)."""
    if len(value) <= 17 and value.isascii() and value.isdigit():
        return (len(value) << 57) | int(value)
    digest = int.from_bytes(blake2b(value.encode(), digest_size=8).digest(), "big")
    return (1 << 63) | (digest >> 1)
