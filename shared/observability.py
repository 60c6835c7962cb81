"""Health, readiness, Prometheus metrics and PII-free logging, the same in every service."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.redaction import redact_my_numbers

REQUESTS = Counter("vrs_http_requests_total", "HTTP requests", ["service", "method", "route", "status"])
LATENCY = Histogram(
    "vrs_http_request_seconds",
    "HTTP request latency",
    ["service", "method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class RedactMyNumber(logging.Filter):
    """Masks anything that looks like a My Number in a record's message (:mod:`shared.redaction`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_my_numbers(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class RedactingFormatter(logging.Formatter):
    """Redacts the whole formatted line, traceback included: an exception's text may quote its input."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_my_numbers(super().format(record))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactMyNumber())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Access logs print paths, and paths carry resident ids: keep them off by default.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): counts and times requests by route template, not raw path."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_template(scope)
            method = scope["method"]
            REQUESTS.labels(self.service, method, route, str(status)).inc()
            LATENCY.labels(self.service, method, route).observe(time.perf_counter() - start)


def _route_template(scope: Scope) -> str:
    # Set by the router on the scope it was given; the template keeps resident ids out of label values.
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))


def install_health(app: FastAPI, *, service: str, ready: Callable[[], Awaitable[None]]) -> None:
    """``/healthz`` (the process answers), ``/readyz`` (its dependencies answer) and ``/metrics``."""

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        try:
            await ready()
        except Exception as exc:
            return JSONResponse({"error": "NotReady", "detail": f"{type(exc).__name__}: {exc}"}, status_code=503)
        return JSONResponse({"status": "ready", "service": service})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(MetricsMiddleware, service=service)
