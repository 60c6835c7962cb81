"""Token buckets and body checks: what the gateway refuses before a service ever sees the request."""

from __future__ import annotations

import math
import time


class RateLimiter:
    """One token bucket per key (a principal, or a client address for anonymous callers).

    A bucket holds at most ``burst`` tokens and refills at ``rate`` per second; a request takes one. Full
    buckets are forgotten when the table grows past ``max_keys``, so a flood of addresses costs bounded memory.
    """

    def __init__(self, *, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, *, now: float | None = None) -> int:
        """0 if the request may go ahead, else the whole seconds to wait (``Retry-After``)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self._rate))
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self._max_keys:
            self._prune(now)
        return 0

    def _prune(self, now: float) -> None:
        full = [k for k, (t, last) in self._buckets.items() if t + (now - last) * self._rate >= self._burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) > self._max_keys:  # still too many: a flood; start over rather than grow
            self._buckets.clear()


_NESTING = bytes.maketrans(b"", b"")
_KEEP = b'[]{}"\\'
_DROP = bytes(c for c in range(256) if c not in _KEEP)


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether a JSON body nests arrays/objects deeper than ``limit`` (strings are skipped, escapes honoured).

    Cheap on ordinary bodies: only a body with more than ``limit`` brackets is scanned at all.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for c in body.translate(_NESTING, _DROP):
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif c in (0x5D, 0x7D):
            depth -= 1
    return False
