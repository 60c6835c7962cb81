"""The gateway's uvicorn protocol: every response leaves in one write, and HTTP/1.1 behaves as before."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.server import ServerState

from services.gateway.server import UVICORN_OPTIONS, GatewayHttpProtocol


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


async def serve(app: Any, data: bytes, *, wait: int = 1) -> FakeTransport:
    config = Config(app=app, lifespan="off", log_level="critical")
    protocol = GatewayHttpProtocol(config=config, server_state=ServerState(), app_state={})
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
