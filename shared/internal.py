"""Service-to-service calls: JSON over HTTP with a short-lived ``service`` token.

aiohttp, not httpx: these calls sit on the dose hot path, and httpx's pool is the slower one under
concurrency (PERFORMANCE.md). One session per client keeps connections warm.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from shared.auth import Role, mint_token
from shared.errors import ServiceUnavailable
from shared.settings import AuthSettings


class InternalClient:
    def __init__(self, base_url: str, *, auth: AuthSettings, caller: str, timeout: float = 10.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._auth = auth
        self._caller = caller
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._token = ""
        self._token_expires = 0.0

    def _authorization(self) -> str:
        now = time.time()
        if now > self._token_expires - 60:
            self._token = mint_token(self._auth, role=Role.SERVICE, subject=self._caller, ttl_seconds=600)
            self._token_expires = now + 600
        return f"Bearer {self._token}"

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                # Below uvicorn's 5 s keep-alive: never reuse a connection the peer is about to close.
                connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=4),
            )
        return self._session

    async def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON body). Raises :class:`ServiceUnavailable` when the peer cannot be reached.

        Internal calls are idempotent by design (look-ups, notices that set a state), so a connection the
        peer dropped is retried once on a fresh one.
        """
        for attempt in (1, 2):
            try:
                async with self._http().request(
                    method,
                    self._base_url + path,
                    json=json,
                    params=params,
                    headers={"Authorization": self._authorization()},
                ) as response:
                    return response.status, await response.json(content_type=None)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if attempt == 2:
                    raise ServiceUnavailable(f"{self._base_url} did not answer: {type(exc).__name__}") from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ServiceUnavailable(f"{self._base_url} did not answer: {type(exc).__name__}") from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
