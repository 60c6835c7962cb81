"""The gateway's two token jobs: verify callers' identity tokens, and mint the internal tokens services trust.

Identity tokens are verified against the identity provider's JWKS (a file or an https URL), loaded at start
(the gateway does not start without it: fail closed), refreshed every ``jwks_refresh_seconds`` and at once
(at most every ``_KICK_SECONDS``) when a token names a ``kid`` the gateway does not know — so a new key is
picked up as soon as it is used, and an old one, once it leaves the JWKS, stops working together with every
cached token it verified. During a rollover the JWKS holds both keys.

Internal tokens (ES256, the gateway's own key) carry the verified caller to a service: short-lived, and one
per caller reused for half its life, so signing costs nothing per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from jose import jwk, jws

from shared.auth import (
    ANONYMOUS,
    Keyset,
    Principal,
    TokenCache,
    TokenRules,
    bearer,
    principal_from_claims,
    unverified_header,
    verify_jwt,
)
from shared.dev_keys import is_development_jwk
from shared.errors import ServiceUnavailable, Unauthorized

log = logging.getLogger(__name__)


class JwksUnavailable(RuntimeError):
    """The identity keys could not be loaded; the message names the source, never a key."""


class JwksSource:
    _KICK_SECONDS = 30.0

    def __init__(
        self,
        *,
        file: Path | None,
        url: str | None,
        default: dict[str, Any] | None,
        refuse_development_keys: bool,
        refresh_seconds: float,
        max_stale_seconds: float,
        on_keys_removed: Callable[[frozenset[str]], object] = lambda _: None,
        fetch_timeout: float = 5.0,
    ) -> None:
        if (file is None) == (url is None) and default is None:
            raise JwksUnavailable("configure exactly one of an identity JWKS file or URL")
        self._file, self._url, self._default = file, url, default
        self._refuse_dev = refuse_development_keys
        self._refresh_seconds = refresh_seconds
        # Only keys that are read again can go stale (a fetch or a re-read of the file failing for so long): the
        # built-in development keys cannot change while the process runs, and nothing refreshes them.
        self._max_stale = max_stale_seconds if file is not None or url is not None else math.inf
        self._on_removed = on_keys_removed
        self._fetch_timeout = fetch_timeout
        self.keyset = Keyset([])
        self.loaded_at = 0.0
        self._last_attempt = 0.0
        self._task: asyncio.Task[None] | None = None
        self._kick: asyncio.Task[None] | None = None

    @property
    def description(self) -> str:
        return str(self._file) if self._file else self._url or "the development JWKS"

    async def _read(self) -> dict[str, Any]:
        if self._file is not None:
            doc: dict[str, Any] = json.loads(await asyncio.to_thread(self._file.read_text))
            return doc
        if self._url is not None:
            async with httpx.AsyncClient(timeout=self._fetch_timeout, follow_redirects=False) as client:
                response = await client.get(self._url, headers={"Accept": "application/json"})
            if response.status_code != 200:
                raise JwksUnavailable(f"{self._url} answered {response.status_code}")
            fetched: dict[str, Any] = response.json()
            return fetched
        assert self._default is not None
        return self._default

    async def refresh(self) -> None:
        """Load the JWKS now; raises :class:`JwksUnavailable` (and keeps the last good keys) on failure."""
        self._last_attempt = time.monotonic()
        try:
            keyset = Keyset.from_jwks(await self._read())
        except JwksUnavailable:
            raise
        except Exception as exc:
            raise JwksUnavailable(f"identity JWKS from {self.description} unusable: {type(exc).__name__}") from None
        if not len(keyset):
            raise JwksUnavailable(f"identity JWKS from {self.description} holds no usable signing key")
        if self._refuse_dev and any(is_development_jwk(k) for k in keyset.jwks()["keys"]):
            raise JwksUnavailable(f"identity JWKS from {self.description} holds a development key")
        removed = self.keyset.kids - keyset.kids
        self.keyset, self.loaded_at = keyset, time.monotonic()
        if removed:
            log.info("identity keys left the JWKS: %s", ", ".join(sorted(removed)))
            self._on_removed(removed)

    async def start(self) -> None:
        await self.refresh()  # fail closed: no keys, no gateway
        if self._default is None or self._file or self._url:
            self._task = asyncio.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.refresh()
            except JwksUnavailable as exc:
                log.warning("%s; keeping the keys loaded %.0f s ago", exc, time.monotonic() - self.loaded_at)

    def kick(self) -> None:
        """A token named an unknown kid: refresh soon, but never more often than every ``_KICK_SECONDS``."""
        if time.monotonic() - self._last_attempt < self._KICK_SECONDS:
            return
        if self._kick is not None and not self._kick.done():
            return
        self._last_attempt = time.monotonic()

        async def refresh_quietly() -> None:
            with contextlib.suppress(JwksUnavailable):
                await self.refresh()

        self._kick = asyncio.get_running_loop().create_task(refresh_quietly())

    def usable(self) -> bool:
        """Keys that could not be read again for ``max_stale_seconds`` are no longer trusted: the gateway then
        refuses tokens."""
        return bool(len(self.keyset)) and time.monotonic() - self.loaded_at < self._max_stale

    async def stop(self) -> None:
        for task in (self._task, self._kick):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class IdentityVerifier:
    """Callers' identity tokens → :class:`Principal` (anonymous without a token)."""

    def __init__(self, source: JwksSource, rules: TokenRules, *, cache_size: int, cache_seconds: float) -> None:
        self._source = source
        self._rules = rules
        self.cache = TokenCache(size=cache_size, ttl_seconds=cache_seconds)

    def keys_removed(self, kids: frozenset[str]) -> None:
        self.cache.drop_kids(kids)

    def principal(self, authorization: str | None) -> Principal:
        if not authorization:
            return ANONYMOUS
        if not self._source.usable():
            raise ServiceUnavailable("token keys are unavailable; retry")
        now = time.time()
        hit = self.cache.get(authorization, now)
        if hit is not None:
            return hit
        token = bearer(authorization)
        try:
            claims, kid = verify_jwt(token, self._source.keyset, self._rules, now=now)
        except Unauthorized:
            named = unverified_header(token).get("kid") if token.count(".") == 2 else None
            if isinstance(named, str) and self._source.keyset.get(named) is None:
                self._source.kick()
            raise
        principal = principal_from_claims(claims)
        self.cache.put(authorization, principal, exp=float(claims["exp"]), kid=kid, now=now)
        return principal


def principal_claims(
    principal: Principal, *, issuer: str, audience: str, ttl_seconds: int, now: float | None = None
) -> dict[str, Any]:
    """The claims naming ``principal``: the same shape in identity and internal tokens."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": principal.subject,
        "role": principal.role.value,
        "iat": issued,
        "exp": issued + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    if principal.municipality:
        claims["municipality"] = principal.municipality
    if principal.institution:
        claims["institution"] = principal.institution
    return claims


def sign_es256(key: Any, kid: str, claims: dict[str, Any]) -> str:
    """A compact JWS (``alg`` ES256, ``kid``) of ``claims``; ``key`` is a PEM or a python-jose key."""
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return str(jws.sign(payload, key, headers={"kid": kid, "typ": "JWT"}, algorithm="ES256"))


class InternalTokenIssuer:
    """Signs internal tokens with the gateway's key; one per caller, reused for half its life."""

    _MAX_CACHED = 100_000

    def __init__(self, *, private_pem: str, kid: str, issuer: str, audience: str, ttl_seconds: int) -> None:
        self._key = jwk.construct(private_pem, "ES256")
        self.public_jwk = {
            **{k: v for k, v in self._key.public_key().to_dict().items() if k in ("kty", "crv", "x", "y")},
            "kid": kid,
            "alg": "ES256",
            "use": "sig",
        }
        self._kid = kid
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl_seconds
        self._cache: dict[Principal, tuple[str, float]] = {}

    def mint(self, principal: Principal, *, now: float | None = None, ttl_seconds: int | None = None) -> str:
        claims = principal_claims(
            principal, issuer=self._issuer, audience=self._audience, now=now, ttl_seconds=ttl_seconds or self._ttl
        )
        return sign_es256(self._key, self._kid, claims)

    def authorization(self, principal: Principal) -> str:
        now = time.time()
        hit = self._cache.get(principal)
        if hit is not None and hit[1] > now:
            return hit[0]
        value = "Bearer " + self.mint(principal, now=now)
        if len(self._cache) >= self._MAX_CACHED:
            self._cache.clear()
        self._cache[principal] = (value, now + self._ttl / 2)
        return value
