"""gateway's HTTP surface: one catch-all ASGI endpoint in front of :class:`~services.gateway.service.Gateway`.

A raw ASGI endpoint rather than a FastAPI route: the gateway has no schema to validate and nothing to
inject, and FastAPI's request/response machinery measured about 30 µs of CPU per request on top of the
app's 40 µs (in-process, upstream stubbed) — a tenth of the whole per-request cost at the proxy's rate.
``/healthz``, ``/readyz`` and ``/metrics`` are registered before it by ``shared.app.build_app`` and win.

:class:`FastPath` goes further: proxied requests skip the app's middleware stack (FastAPI's telemetry and
body-limit wrappers, Starlette's error and exception middlewares, the router, the request-id and metrics
middlewares — a third of the gateway's serving CPU under load, py-spy) and reach the endpoint directly; it
does itself what those did for them (request id in the log context, the same metrics, a generic 500).
Only the gateway's own few paths still go through the stack. It is entered from the app's own ``__call__``
(``services.gateway.app.GatewayApp``), before FastAPI's (which reads the environment for its telemetry on
every request) and Starlette's.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from services.gateway.audit import entries_of_municipality, page_parameters, utc_text
from services.gateway.policy import Match
from services.gateway.proxy import FORWARDED_REQUEST_HEADERS, RawHeaders
from services.gateway.service import Gateway, Inbound, Outcome, error_outcome
from shared.auth import Principal
from shared.db import Databases, utcnow
from shared.domain.period import kept_since
from shared.errors import BadRequest, PayloadTooLarge, VRSError, period_parameters
from shared.observability import LATENCY, REQUEST_ID, REQUESTS

log = logging.getLogger(__name__)

# A caller's request id is kept if it is short and plain; it lands in logs and the audit log.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Otherwise the gateway names the request: unique, not secret — a random prefix per process and a counter, the
# same 32 hex digits as a UUID without a getrandom system call and a UUID object per request (py-spy: ~3 %).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4)))


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class ClientDisconnected(Exception):
    pass


def inbound(scope: Scope) -> Inbound:
    """The request as the gateway sees it; raises ``BadRequest`` for a forwarded header that is not UTF-8."""
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        # First value wins: the gateway forwards exactly the one Authorization it verified.
        if name in FORWARDED_REQUEST_HEADERS and (key := name.decode("latin-1")) not in headers:
            # UTF-8, not Latin-1: the transports encode header values as UTF-8, so the upstream gets the
            # very bytes the caller sent (a purpose written in Japanese, say).
            try:
                headers[key] = value.decode()
            except UnicodeDecodeError:
                raise BadRequest(f"header {key} is not UTF-8") from None
    request_id = headers.get("x-request-id")
    if request_id is None or not _REQUEST_ID.fullmatch(request_id):
        headers["x-request-id"] = new_request_id()
    raw_path: bytes | None = scope.get("raw_path")
    raw = raw_path.split(b"?", 1)[0].decode("latin-1") if raw_path else quote(scope["path"])
    client = scope.get("client")
    return Inbound(
        method=scope["method"],
        path=scope["path"],
        raw_path=raw,
        query_string=scope["query_string"].decode("latin-1"),
        headers=headers,
        client=client[0] if client else "unknown",
    )


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            if not limit:
                raise BadRequest("this request takes no body")
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


Answer = tuple[int, RawHeaders, bytes]  # status, headers (``X-Request-ID`` included, no length), body


async def proxy_answer(scope: Scope, receive: Receive) -> Answer | None:
    """The gateway's answer to one request (None: the caller left while sending its body)."""
    gateway: Gateway = scope["app"].state.gateway
    try:
        request = inbound(scope)
    except VRSError as err:
        return _answer(error_outcome(None, err), new_request_id())

    async def read_body(limit: int) -> bytes:
        return await _read_body(receive, limit)

    token = REQUEST_ID.set(request.headers["x-request-id"])
    try:
        outcome = await gateway.handle(request, read_body=read_body)
    except ClientDisconnected:
        return None
    finally:
        REQUEST_ID.reset(token)
    if outcome.match is not None:
        # Metrics are labelled by ``scope["route"].path``: the rule's template, never a resident id.
        scope["route"] = outcome.match.rule
    return _answer(outcome, request.headers["x-request-id"])


def _answer(outcome: Outcome, request_id: str) -> Answer:
    return outcome.status, [*outcome.headers, (b"x-request-id", request_id.encode())], outcome.body


async def _respond(send: Send, answer: Answer) -> None:
    status, headers, body = answer
    headers = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ProxyEndpoint:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await proxy_answer(scope, receive)
        if answer is not None:
            await _respond(send, answer)


def audit_reader(databases: Databases, keep_years: int) -> Callable[[Inbound, Match, Principal], Awaitable[Outcome]]:
    """``GET /api/v1/municipalities/{code}/audit?from=&to=``: answered by the gateway from its own trail, with where
    its retention stands (``kept_from``: entries recorded before are deleted)."""

    async def read(inbound: Inbound, match: Match, _: Principal) -> Outcome:
        query = {name: values[0] for name, values in parse_qs(inbound.query_string).items()}
        try:
            since, until = period_parameters(query.get("from"), query.get("to"))
            after, limit = page_parameters(query.get("after"), query.get("limit"))
            entries, more = await entries_of_municipality(
                databases, match.params["code"], since=since, until=until, after=after, limit=limit
            )
        except VRSError as err:
            return error_outcome(match, err)
        last = f"{entries[-1]['instance']}:{entries[-1]['seq']}" if more else None
        kept_from = utc_text(kept_since(utcnow(), keep_years))
        answer = {"entries": entries, "truncated": more, "next": last, "kept_from": kept_from}
        body = json.dumps(answer, ensure_ascii=False).encode()
        return Outcome(match, 200, [(b"content-type", b"application/json")], body)

    return read


async def jwks(request: Request) -> Response:
    """``/.well-known/jwks.json``: the identity keys this gateway verifies callers' tokens with."""
    return JSONResponse(request.app.state.identity_keys.keyset.jwks())


_INTERNAL_ERROR = b'{"error":"InternalError","detail":"internal error"}'


class FastPath:
    """What the gateway app does first with a request: a proxied one goes straight to :func:`proxy_answer`
    (:meth:`serves` says which); the gateway's own paths are left to the app's stack. :meth:`answer` is also what
    the gateway's HTTP protocol calls without ASGI (``services.gateway.server``)."""

    def __init__(self, *, own_paths: frozenset[str], service: str = "gateway") -> None:
        self._own = own_paths
        self._service = service
        # Prometheus' ``labels()`` looks its child up under a lock each time: keep the children.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._timers: dict[tuple[str, str], Any] = {}

    def serves(self, scope: Scope) -> bool:
        return scope["type"] == "http" and scope["path"] not in self._own

    async def answer(self, scope: Scope, receive: Receive) -> Answer | None:
        """The answer to a proxied request (None if the caller left), counted and timed; an unexpected error is a
        generic 500."""
        start = perf_counter()
        status = 500
        try:
            answer = await proxy_answer(scope, receive)
            if answer is not None:
                status = answer[0]
            return answer
        except Exception:
            log.exception("unexpected error in the gateway")
            return 500, [(b"content-type", b"application/json")], _INTERNAL_ERROR
        finally:
            route = str(getattr(scope.get("route"), "path", "unmatched"))
            method = scope["method"]
            key = (method, route, status)
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = REQUESTS.labels(self._service, method, route, str(status))
            counter.inc()
            timer = self._timers.get(key[:2])
            if timer is None:
                timer = self._timers[key[:2]] = LATENCY.labels(self._service, method, route)
            timer.observe(perf_counter() - start)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await self.answer(scope, receive)
        if answer is not None:
            await _respond(send, answer)


router = APIRouter()
router.routes.append(Route("/.well-known/jwks.json", jwks, methods=["GET"], include_in_schema=False))
router.routes.append(Route("/{path:path}", ProxyEndpoint(), methods=_METHODS, include_in_schema=False))
