"""The gateway's uvicorn protocol: every response leaves in one write, proxied requests skip ASGI, and HTTP/1.1
(keep-alive, pipelining, HEAD, Connection: close, errors) behaves as before."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.server import ServerState

from services.gateway.router import FastPath
from services.gateway.server import UVICORN_OPTIONS, GatewayHttpProtocol
from services.gateway.service import Outcome


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)


async def whole(scope: Scope, receive: Receive, send: Send) -> None:
    body = b'{"ok":true,"path":"' + scope["path"].encode() + b'"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def streamed(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/csv")]})
    await send({"type": "http.response.body", "body": b"a,b\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"1,2\n"})


async def fails_after_start(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
    raise RuntimeError("boom")


async def serve(app: Any, data: bytes, *, wait: int = 1, proxy_headers: bool = False) -> FakeTransport:
    # As the gateway runs: --no-proxy-headers.
    config = Config(app=app, lifespan="off", log_level="critical", proxy_headers=proxy_headers)
    state = ServerState()
    state.default_headers = [(b"date", b"Thu, 26 Nov 2026 00:00:00 GMT"), (b"server", b"uvicorn")]  # the server's
    protocol = GatewayHttpProtocol(config=config, server_state=state, app_state={})
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(data)
    for _ in range(50):
        if len(transport.writes) >= wait and not protocol.tasks:
            break
        await asyncio.sleep(0)
    protocol._unset_keepalive_if_required()
    return transport


GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_a_response_is_one_write_of_its_head_and_body() -> None:
    transport = await serve(whole, GET)
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 23" in head
    assert body == b'{"ok":true,"path":"/a"}' and not transport.closed


async def test_pipelined_requests_get_their_answers_in_order_one_write_each() -> None:
    transport = await serve(whole, GET + GET.replace(b"/a", b"/b"), wait=2)
    assert [w.endswith(b'"path":"/a"}') for w in transport.writes] == [True, False]
    assert transport.writes[1].endswith(b'"path":"/b"}') and len(transport.writes) == 2


async def test_connection_close_is_honoured_after_the_one_write() -> None:
    transport = await serve(whole, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert len(transport.writes) == 1 and b"connection: close" in transport.writes[0]
    assert transport.closed


async def test_head_gets_the_head_alone() -> None:
    transport = await serve(whole, b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(transport.writes) == 1 and transport.writes[0].endswith(b"\r\n\r\n")


async def test_a_streamed_response_sends_its_head_with_the_first_chunk() -> None:
    transport = await serve(streamed, GET, wait=2)
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK") and transport.writes[0].endswith(b"4\r\na,b\n\r\n")
    assert b"transfer-encoding: chunked" in transport.writes[0]
    assert transport.writes[1] == b"4\r\n1,2\n\r\n0\r\n\r\n"


async def test_a_failure_after_the_start_is_a_whole_500_not_a_cut_answer() -> None:
    transport = await serve(fails_after_start, GET)
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 500 ") and transport.writes[0].endswith(b"Internal Server Error")
    assert b"content-length: 10" not in transport.writes[0]


@pytest.mark.parametrize("option", ["--no-proxy-headers"])
def test_the_gateway_runs_with_its_protocol_and_trusts_no_forwarded_headers(option: str) -> None:
    assert UVICORN_OPTIONS[UVICORN_OPTIONS.index("--http") + 1] == "services.gateway.server:GatewayHttpProtocol"
    assert option in UVICORN_OPTIONS


class StubGateway:
    """Answers like the gateway's pipeline does, echoing what it was given."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def handle(self, request: Any, *, read_body: Any) -> Outcome:
        body = await read_body(1024)
        self.bodies.append(body)
        if request.path == "/boom":
            raise RuntimeError("secret detail")
        answer = b'{"path":"' + request.path.encode() + b'"}'
        return Outcome(None, 201 if body else 200, [(b"Content-Type", b"application/json")], answer)


class GatewayLikeApp:
    """The shape the protocol looks for: ``fast_path``, and the gateway on ``state``; own paths through ASGI."""

    def __init__(self) -> None:
        self.state = SimpleNamespace(gateway=StubGateway())
        self.fast_path = FastPath(own_paths=frozenset({"/healthz"}))
        self.asgi_calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.asgi_calls += 1
        await whole(scope, receive, send)


async def test_proxied_requests_are_answered_without_asgi_in_one_write() -> None:
    app = GatewayLikeApp()
    post = b'POST /api/v1/doses HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nX-Request-ID: r-1\r\n\r\n{"a":1}'
    transport = await serve(app, GET + post + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", wait=3)
    assert app.asgi_calls == 1  # /healthz only
    assert app.state.gateway.bodies == [b"", b'{"a":1}']
    first, second, third = transport.writes
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b'\r\n\r\n{"path":"/a"}')
    assert b"content-type: application/json\r\n" in first and b"content-length: 13\r\n" in first
    assert b"\r\ndate: Thu, 26 Nov 2026 00:00:00 GMT\r\nserver: uvicorn\r\n" in first and b"x-request-id: " in first
    assert second.startswith(b"HTTP/1.1 201 Created\r\n") and b"x-request-id: r-1\r\n" in second
    assert second.endswith(b'{"path":"/api/v1/doses"}') and third.endswith(b'"path":"/healthz"}')
    assert not transport.closed


async def test_a_proxied_head_gets_no_body_and_close_closes() -> None:
    app = GatewayLikeApp()
    transport = await serve(app, b"HEAD /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert len(transport.writes) == 1 and transport.writes[0].endswith(b"connection: close\r\n\r\n")
    assert b"content-length: 13\r\n" in transport.writes[0] and transport.closed


async def test_a_proxied_request_that_fails_gets_the_generic_500() -> None:
    transport = await serve(GatewayLikeApp(), b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.writes[0].startswith(b"HTTP/1.1 500 ")
    assert transport.writes[0].endswith(b'\r\n\r\n{"error":"InternalError","detail":"internal error"}')
    assert b"secret" not in transport.writes[0]


async def test_an_app_wrapped_by_uvicorn_middleware_keeps_asgi() -> None:
    """With uvicorn's proxy headers on, its middleware must see every request: no request skips it."""
    app = GatewayLikeApp()
    transport = await serve(app, GET, proxy_headers=True)
    assert app.asgi_calls == 1 and transport.writes[0].endswith(b'"path":"/a"}')
