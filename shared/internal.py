"""Service-to-service reads on a caller's behalf: JSON over HTTP carrying the caller's own internal token.

There is no service identity: a call made while serving a request forwards that request's internal token
(:data:`shared.auth.forwarded_authorization`), so the callee sees — and re-checks the scope of — the
municipality or institution that asked. A call made outside any request carries no token and is refused —
except on the few paths whose authority is a registry-signed grant in the body instead (shared/grants.py:
records' dose-version check, which registry's revocation sweep makes with no caller).

A service never calls another with authority of its own: what it may read there is exactly what its caller
may read, or what a narrow, seconds-long grant names. Data flows one way (registry → records → stats) through
events; these calls only read.
aiohttp, not httpx: its pool is the faster one under concurrency (PERFORMANCE.md).
"""

from __future__ import annotations

from typing import Any

import aiohttp

from shared.auth import forwarded_authorization
from shared.errors import ServiceUnavailable
from shared.observability import REQUEST_ID


class InternalClient:
    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @staticmethod
    def _headers(authorization: str | None) -> dict[str, str]:
        headers = {"Authorization": authorization} if authorization else {}
        # The caller's request id goes along, so one request's log lines can be followed across services.
        if (request_id := REQUEST_ID.get()) is not None:
            headers["X-Request-ID"] = request_id
        return headers

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                # Below uvicorn's 5 s keep-alive: never reuse a connection the peer is about to close.
                connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=4),
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON body). Raises :class:`ServiceUnavailable` when the peer cannot be reached.

        The request being served's internal token is forwarded. Internal calls are reads, so a connection the
        peer dropped is retried once on a fresh one.
        """
        headers = self._headers(forwarded_authorization.get())
        for attempt in (1, 2):
            try:
                async with self._http().request(
                    method,
                    self._base_url + path,
                    json=json,
                    params=params,
                    headers=headers,
                ) as response:
                    return response.status, await response.json(content_type=None)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if attempt == 2:
                    raise ServiceUnavailable("a backing service did not answer; retry") from None
            except (aiohttp.ClientError, TimeoutError):
                raise ServiceUnavailable("a backing service did not answer; retry") from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
