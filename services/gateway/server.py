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
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

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


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol with :class:`OneWriteCycle` cycles."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # The cycle was just made (its task has not run yet, nor has any pipelined one): same state, one more
        # rule for its writes.
        if type(self.cycle) is RequestResponseCycle:
            self.cycle.__class__ = OneWriteCycle
