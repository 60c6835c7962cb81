"""The gateway's fast path: proxied requests skip FastAPI's stack, yet still get a generic 500 and metrics."""

from __future__ import annotations

from collections.abc import MutableMapping
from types import SimpleNamespace
from typing import Any

from services.gateway.router import FastPath
from shared.observability import REQUESTS


class _Broken:
    async def handle(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError("secret internal detail http://10.0.0.7:8002")


async def test_an_unexpected_error_is_a_generic_500_and_counted() -> None:
    app = SimpleNamespace(state=SimpleNamespace(gateway=_Broken()))
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/api/v1/stats/doses",
        "raw_path": b"/api/v1/stats/doses",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "app": app,
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    counter = REQUESTS.labels("gateway", "GET", "unmatched", "500")
    before = counter._value.get()
    fast_path = FastPath(own_paths=frozenset({"/healthz"}))
    assert fast_path.serves(scope) and not fast_path.serves({**scope, "path": "/healthz"})
    await fast_path(scope, receive, send)
    assert sent[0]["status"] == 500
    assert sent[1]["body"] == b'{"error":"InternalError","detail":"internal error"}'
    assert counter._value.get() == before + 1
