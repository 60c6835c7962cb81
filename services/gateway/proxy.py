"""The proxy transport: one small interface, two implementations.

:class:`AiohttpTransport` is the default: as the gateway's client it carries five to six times httpx's rate
(httpx's pool is the bottleneck under concurrency; PERFORMANCE.md, and ``python -m devtools.bench.gateway``
on this code). :class:`HttpxTransport` stays for comparison (``VRS_GATEWAY_PROXY_TRANSPORT=httpx``).

Both send exactly what they are given — no default ``User-Agent``, ``Accept`` or ``Accept-Encoding``, no
cookies kept between requests (a cookie jar in a shared proxy client would hand one caller's cookies to
the next) — and give back the body bytes as they came, never decompressed or re-encoded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Protocol

import aiohttp
import httpx
from yarl import URL

from services.gateway.settings import GatewaySettings

RawHeaders = list[tuple[bytes, bytes]]

# What a caller's request may carry to an upstream; everything else stays at the gateway.
FORWARDED_REQUEST_HEADERS = frozenset(
    {b"authorization", b"content-type", b"accept", b"idempotency-key", b"x-request-id", b"x-access-purpose"}
)
# Never copied from an upstream's answer: hop-by-hop headers (RFC 9110 §7.6.1), and what the gateway's
# own server sets (length, date, server) or the gateway decides (the request id).
_NOT_RETURNED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"date",
        b"server",
        b"x-request-id",
    }
)


def returned_headers(headers: RawHeaders) -> RawHeaders:
    """The upstream's response headers a caller gets: all but hop-by-hop and the gateway's own."""
    named_in_connection: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named_in_connection.update(t.strip().lower() for t in value.split(b","))
    return [
        (name, value)
        for name, value in headers
        if (low := name.lower()) not in _NOT_RETURNED and low not in named_in_connection
    ]


class UpstreamResponse(NamedTuple):
    status: int
    headers: RawHeaders  # as received, names in any case
    body: bytes


class UpstreamUnreachable(Exception):
    """No answer: refused, unresolvable, connect timeout, or the connection dropped before a response."""


class UpstreamTimeout(Exception):
    """Connected, but the answer did not arrive in time."""


class Transport(Protocol):
    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        """One exchange. ``url`` is already percent-encoded and is sent as is.

        Raises :class:`UpstreamUnreachable` or :class:`UpstreamTimeout`; any status is a normal answer.
        """
        ...

    async def close(self) -> None: ...


class AiohttpTransport:
    def __init__(
        self,
        *,
        pool_size: int,
        upstreams: int = 3,
        connect_timeout: float,
        timeout: float,
        keepalive: float,
    ) -> None:
        connector = aiohttp.TCPConnector(
            limit=pool_size * upstreams, limit_per_host=pool_size, keepalive_timeout=keepalive
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        try:
            async with self._session.request(
                method, URL(url, encoded=True), headers=headers, data=body or None, allow_redirects=False
            ) as response:
                return UpstreamResponse(response.status, list(response.raw_headers), await response.read())
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamUnreachable(f"connect timeout: {exc}") from None
        except TimeoutError as exc:  # aiohttp's read timeouts subclass it
            raise UpstreamTimeout(f"{type(exc).__name__}") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        await self._session.close()


class HttpxTransport:
    """httpx's connection pool without its client: the client would add default headers and keep cookies."""

    def __init__(
        self, *, pool_size: int, upstreams: int = 3, connect_timeout: float, timeout: float, keepalive: float
    ) -> None:
        # httpx has no per-host limit; the total is what the aiohttp pool allows across all upstreams.
        size = pool_size * upstreams
        self._transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=keepalive)
        )
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout).as_dict()

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        # Bytes, because httpx would encode str values as ASCII and refuse anything else.
        raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
        request = httpx.Request(method, url, headers=raw_headers, content=body or None)
        request.extensions["timeout"] = self._timeout
        try:
            response = await self._transport.handle_async_request(request)
            try:
                content = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
            raise UpstreamUnreachable(f"{type(exc).__name__}: {exc}") from None
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(type(exc).__name__) from None
        except httpx.TransportError as exc:
            raise UpstreamUnreachable(f"{type(exc).__name__}: {exc}") from None
        return UpstreamResponse(response.status_code, list(response.headers.raw), content)

    async def close(self) -> None:
        await self._transport.aclose()


def create_transport(settings: GatewaySettings) -> Transport:
    cls: type[AiohttpTransport | HttpxTransport] = (
        HttpxTransport if settings.proxy_transport == "httpx" else AiohttpTransport
    )
    return cls(
        pool_size=settings.proxy_pool_size,
        connect_timeout=settings.proxy_connect_timeout_seconds,
        timeout=settings.proxy_timeout_seconds,
        keepalive=settings.proxy_keepalive_seconds,
    )
