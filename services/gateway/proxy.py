"""The proxy transport: one small interface, three implementations.

:class:`RawTransport` is the default: HTTP/1.1 keep-alive connections of its own, parsed with httptools (the
parser uvicorn serves with), and nothing else — the upstreams are our own services on a private network,
and the gateway needs no redirects, cookies, proxies, compression or multipart. aiohttp's client machinery
was a fifth of the gateway's CPU under load (py-spy); :class:`AiohttpTransport`
(``VRS_GATEWAY_PROXY_TRANSPORT=aiohttp``) carried five to six times httpx's rate, and
:class:`HttpxTransport` stays for comparison (PERFORMANCE.md, ``python -m devtools.bench gateway``).

Both send exactly what they are given — no default ``User-Agent``, ``Accept`` or ``Accept-Encoding``, no
cookies kept between requests (a cookie jar in a shared proxy client would hand one caller's cookies to
the next) — and give back the body bytes as they came, never decompressed or re-encoded.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Mapping
from typing import NamedTuple, Protocol

import aiohttp
import httptools
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


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream: one exchange at a time, the answer parsed by httptools."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the pool: get_running_loop() costs a getpid()
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._headers: RawHeaders = []
        self._body: list[bytes] = []
        self._head = False

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports quack alike

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(UpstreamUnreachable("malformed response"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(UpstreamUnreachable("connection closed before the response was complete"))

    # -- httptools callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._head:
            # An answer to HEAD has no body whatever its Content-Length says; the parser cannot be told so,
            # so the answer ends here and the connection is not reused.
            self._body = []
            self.on_message_complete()
            self.close()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            self.close()  # an answer nobody asked for: the connection is out of step
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        waiter.set_result(UpstreamResponse(self._parser.get_status_code(), self._headers, body))
        if not self._parser.should_keep_alive():
            self.close()

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close()

    def _timed_out(self) -> None:
        self._fail(UpstreamTimeout("TimeoutError"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def exchange(
        self, request: bytes, loop: asyncio.AbstractEventLoop, timeout: float, *, head: bool = False
    ) -> UpstreamResponse:
        """Send ``request`` and wait for the answer; :class:`UpstreamTimeout` after ``timeout`` seconds (the
        connection is then closed: it is out of step). One timer handle rather than ``asyncio.timeout``'s
        context manager, which costs more than the rest of this method."""
        assert self.transport is not None and self._waiter is None
        self._headers, self._body, self._head = [], [], head
        waiter: asyncio.Future[UpstreamResponse] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout, self._timed_out)
        self.transport.write(request)
        try:
            return await waiter
        finally:
            timer.cancel()


class RawTransport:
    """Pools of :class:`_Connection` per upstream (``pool_size`` each), idle ones closed after ``keepalive``.

    A connection that times out or fails mid-exchange is closed, never reused. No request is retried: a POST
    the upstream may have acted on must not be sent twice.
    """

    def __init__(
        self, *, pool_size: int, upstreams: int = 3, connect_timeout: float, timeout: float, keepalive: float
    ) -> None:
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._keepalive = keepalive
        self._idle: dict[str, collections.deque[_Connection]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._origins: dict[str, tuple[str, int, bool, bytes]] = {}
        self._open: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None

    def _origin(self, origin: str) -> tuple[str, int, bool, bytes]:
        parsed = self._origins.get(origin)
        if parsed is None:
            scheme, _, hostport = origin.partition("://")
            host, _, port = hostport.rpartition(":") if hostport.rsplit(":", 1)[-1].isdigit() else (hostport, "", "")
            tls = scheme == "https"
            parsed = (host, int(port) if port else (443 if tls else 80), tls, hostport.encode())
            self._origins[origin] = parsed
        return parsed

    async def _acquire(self, origin: str) -> _Connection:
        idle = self._idle.setdefault(origin, collections.deque())
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn
            conn.close()
            self._open.discard(conn)
        host, port, tls, _ = self._origin(origin)
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(_Connection, host, port, ssl=self._ssl if tls else None)
        except TimeoutError:
            raise UpstreamUnreachable("connect timeout") from None
        except OSError as exc:
            raise UpstreamUnreachable(f"{type(exc).__name__}: {exc}") from None
        conn.loop = loop
        self._open.add(conn)
        return conn

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        at = url.find("/", url.find("://") + 3)
        origin, target = (url[:at], url[at:]) if at > 0 else (url, "/")
        host_header = self._origin(origin)[3]
        lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), b"Host: ", host_header, b"\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: ".encode("latin-1") + value.encode() + b"\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        request = b"".join(lines) + body
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = asyncio.Semaphore(self._pool_size)
        async with slots:
            conn = await self._acquire(origin)
            try:
                assert conn.loop is not None
                response = await conn.exchange(request, conn.loop, self._timeout, head=method == "HEAD")
            except BaseException:
                conn.close()
                self._open.discard(conn)
                raise
            if conn.closed:
                self._open.discard(conn)
            else:
                conn.idle_since = time.monotonic()
                self._idle[origin].append(conn)
            return response

    async def close(self) -> None:
        for conn in self._open:
            conn.close()
        self._open.clear()
        self._idle.clear()


def create_transport(settings: GatewaySettings) -> Transport:
    cls: type[RawTransport | AiohttpTransport | HttpxTransport] = RawTransport
    if settings.proxy_transport == "aiohttp":
        cls = AiohttpTransport
    elif settings.proxy_transport == "httpx":
        cls = HttpxTransport
    return cls(
        pool_size=settings.proxy_pool_size,
        connect_timeout=settings.proxy_connect_timeout_seconds,
        timeout=settings.proxy_timeout_seconds,
        keepalive=settings.proxy_keepalive_seconds,
    )
