"""Fake upstreams as real HTTP servers, and the gateway app in front of them.

The gateway's transport is real aiohttp (or httpx), so its upstreams must be real sockets: each fake runs
in uvicorn in this process. The gateway app itself is called through ``httpx.ASGITransport``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from shared.errors import error_response, install_error_handlers, resident_not_found

MIGRATIONS = Path(__file__).resolve().parents[4] / "services" / "gateway" / "migrations" / "main"
KNOWN_RESIDENT = "r-known"
CSV = "集計日,接種回数\r\n2021-04-12,100\r\n".encode()


@dataclass
class Seen:
    """One request as an upstream received it."""

    method: str
    path: str
    raw_path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class FakeUpstream:
    name: str
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    # Runs after a request is seen and before it is answered: a fault injected "while the service acts".
    while_acting: Callable[[Seen], Awaitable[None]] | None = None


def fake_app(upstream: FakeUpstream) -> FastAPI:
    """Echoes what it received; ``fake_*`` query parameters (headers would not pass the gateway) steer it."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def echo(request: Request, path: str) -> Response:
        seen = Seen(
            method=request.method,
            path=request.url.path,
            raw_path=request.scope["raw_path"].decode("latin-1"),
            query=request.scope["query_string"].decode("latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]],
            body=await request.body(),
        )
        upstream.seen.append(seen)
        if upstream.while_acting is not None:
            await upstream.while_acting(seen)
        if delay := request.query_params.get("fake_sleep"):
            await asyncio.sleep(float(delay))
        parts = path.split("/")
        # registry's answer for a resident it does not have, rendered by registry's own code
        resident_read = path.startswith("api/v1/municipalities/") and parts[4:5] == ["residents"] and len(parts) == 6
        if resident_read and parts[5] != KNOWN_RESIDENT:
            return error_response(resident_not_found())
        if path.startswith("api/v1/municipalities/") and parts[4:5] == ["transfer-lookups"]:
            return error_response(resident_not_found())
        if path == "api/v1/opendata/summary_by_date.csv":
            return Response(CSV, media_type="text/csv; charset=utf-8")
        if request.query_params.get("fake_stream"):
            # No Content-Length: sent chunked, as stats streams its cuts.
            rows = (f'{{"n":{n}}}\n'.encode() for n in range(int(request.query_params["fake_stream"])))
            return StreamingResponse(rows, media_type="application/x-ndjson")
        if request.query_params.get("fake_gzip"):
            return Response(
                gzip.compress(b'{"rows":[]}'), headers={"content-encoding": "gzip"}, media_type="application/json"
            )
        status = int(request.query_params.get("fake_status", "200"))
        return JSONResponse(
            {
                "upstream": upstream.name,
                "method": seen.method,
                "raw_path": seen.raw_path,
                "query": seen.query,
                "headers": seen.headers,
                "body": base64.b64encode(seen.body).decode(),
            },
            status_code=status,
            headers={"x-upstream": upstream.name, "set-cookie": f"sticky={upstream.name}; Path=/"},
        )

    return app


class _InProcessServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()

    # Leave Ctrl-C to pytest.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _InProcessServer(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            await server.listening.wait()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def running_gateway(settings: GatewaySettings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client,
    ):
        yield app, client
