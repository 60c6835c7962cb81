"""The gateway's HTTP server protocol: uvicorn's httptools protocol, each response written in one piece.

Run the gateway with ``uvicorn … --http services.gateway.server:GatewayHttpProtocol --no-proxy-headers``.

uvicorn writes a response's status line and headers as soon as the app sends ``http.response.start``, and the
body with the next message: two ``write`` system calls, two TCP segments and, on the other end, often two
wake-ups and two reads for one small answer. The gateway always sends its answers whole (a ``Content-Length``
head and one body), so here the head waits for the body's first message and both go out in one write. An app that
fails after starting a response, and before its body, now gets uvicorn's 500 instead of a head and a cut
connection: nothing of the first head was sent yet.

``--no-proxy-headers``: the gateway rate-limits anonymous callers by their TCP peer (README, "Limits"), so no
``X-Forwarded-For`` may replace the peer — uvicorn's default trusts it from 127.0.0.1, which a sidecar proxy
would be.

uvicorn is pinned (pyproject): this subclasses its protocol, and ``tests/unit/services/gateway/test_server.py``
checks the writes on that version.
"""

from __future__ import annotations

from typing import Any, cast

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from services.gateway.proxy import RawHeaders

# How uvicorn runs the gateway (the launcher, the bench, deploy/k8s/base/apps/gateway.yaml).
UVICORN_OPTIONS = ["--http", "services.gateway.server:GatewayHttpProtocol", "--no-proxy-headers"]


class _Gathered:
    """Stands in for the transport while one response's head and body are produced: one write at the end."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def flush(self) -> None:
        if self.parts:
            parts, self.parts = self.parts, []
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class OneWriteCycle(RequestResponseCycle):
    """A request-response cycle whose ``http.response.start`` is held until the first body message."""

    _start: ASGISendEvent | None = None

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            # A second start (uvicorn's own 500 after the app failed) replaces one never written.
            self._start = message
            return
        start = self._start
        if start is None:
            await super().send(message)
            return
        self._start = None
        gathered = _Gathered(self.transport)
        self.transport = cast(Any, gathered)
        try:
            await super().send(start)
            await super().send(message)
        finally:
            self.transport = gathered.transport
            gathered.flush()


class ProxyCycle(OneWriteCycle):
    """A proxied request, answered without ASGI: :meth:`FastPath.answer <services.gateway.router.FastPath.answer>`
    (what the app's ASGI entry calls too) gives status, headers and body, written here in one piece.

    What this skips per request — the ASGI scope dispatch, two message dicts, uvicorn's ``send`` state machine and
    the app's own ASGI wrapper — was ~15 µs of the gateway's CPU (in-process measurement, of ~190 µs a proxied
    request). Reading the body (``receive``: 100-continue, flow control, disconnects), keep-alive, pipelining and
    shutdown stay uvicorn's, as the cycle is uvicorn's.
    """

    async def run_asgi(self, app: Any) -> None:
        # What the app's own entry would have set (the gateway's state hangs off it).
        cast(dict[str, Any], self.scope)["app"] = app
        try:
            answer = await app.fast_path.answer(self.scope, self.receive)
            if answer is not None and not self.disconnected:
                if self.flow.write_paused:
                    await self.flow.drain()
                self._write_whole(*answer)
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        finally:
            self.on_response = lambda: None

    def _write_whole(self, status: int, headers: RawHeaders, body: bytes) -> None:
        if self.disconnected:
            return
        self.response_started = True
        self.waiting_for_100_continue = False
        if self.access_log:
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(self.scope),
                self.scope["method"],
                get_path_with_query_string(self.scope),
                self.scope["http_version"],
                status,
            )
        parts = [STATUS_LINE[status]]
        for name, value in self.default_headers:
            parts += (name, b": ", value, b"\r\n")
        for name, value in headers:
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                raise RuntimeError("Invalid HTTP header.")
            parts += (name.lower(), b": ", value, b"\r\n")
        parts.append(b"content-length: %d\r\n" % len(body))
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if self.scope["method"] != "HEAD":
            parts.append(body)
        self.transport.write(b"".join(parts))
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol: proxied requests in :class:`ProxyCycle`, the rest in :class:`OneWriteCycle`."""

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # Where uvicorn starts a cycle's task (at once, or once the pipelined requests before it are answered):
        # same state, other rules for answering. A proxied request skips ASGI only when the app is the gateway's
        # own, unwrapped (no uvicorn middleware such as proxy headers), and is not uvicorn's concurrency-limit 503.
        if type(cycle) is RequestResponseCycle:
            fast_path = getattr(app, "fast_path", None)
            if fast_path is not None and app is self.app and fast_path.serves(cycle.scope):
                cycle.__class__ = ProxyCycle
            else:
                cycle.__class__ = OneWriteCycle
        super()._start_asgi_task(cycle, app)
