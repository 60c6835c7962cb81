"""Health, readiness, Prometheus metrics and PII-free logging, the same in every service.

Logs are one JSON object per line (time, level, logger, message, service, request_id, and traceback when
there is one), My Numbers masked in the message and the traceback alike. The request id is the gateway's
``X-Request-ID``, carried to every service and kept in a context variable for the request's duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import json
import logging
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest, start_http_server
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.heap import settle_heap
from shared.redaction import redact_my_numbers

REQUESTS = Counter("vrs_http_requests_total", "HTTP requests", ["service", "method", "route", "status"])
LATENCY = Histogram(
    "vrs_http_request_seconds",
    "HTTP request latency",
    ["service", "method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

# Outbox and consumer health, shared by every service that has an outbox or consumes a topic. Backlog and
# age are sampled when /metrics is scraped (see ``install_health(collect=...)``), so they are true at scrape
# time whichever replica runs the relay.
OUTBOX_BACKLOG = Gauge(
    "vrs_outbox_backlog_events",
    "Outbox rows (bus messages) not yet published: an event each, or a batch's events of one key together",
    ["service", "shard"],
)
OUTBOX_OLDEST_AGE = Gauge(
    "vrs_outbox_oldest_unpublished_seconds",
    "Age of the oldest unpublished outbox event (0: none)",
    ["service", "shard"],
)
CONSUMER_LAG = Gauge(
    "vrs_consumer_lag_events", "Events on the bus not yet applied by the consumer", ["consumer", "topic", "partition"]
)
EVENT_AGE = Histogram(
    "vrs_consumer_event_age_seconds",
    "From an event's occurred_at to the commit that applied it",
    ["consumer", "topic"],
    # Seconds when live; hours or days while a replay catches up.
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600),
)
GC_PAUSE = Histogram(
    "vrs_gc_pause_seconds",
    "Python garbage collections: how long each held the process (every request in it waits)",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
COLLECT_FAILURES = Counter("vrs_metrics_collect_failures_total", "Scrape-time samplers that failed", ["service"])


def watch_gc() -> None:
    """Time every garbage collection of this process (:data:`GC_PAUSE`); once per process, however many apps."""
    if any(getattr(callback, "__name__", "") == "_gc_timer" for callback in gc.callbacks):
        return
    started = 0.0
    # Bound once: a young collection runs every few hundred allocations, so the callback stays a few µs.
    by_generation = [GC_PAUSE.labels(str(generation)) for generation in range(3)]

    def _gc_timer(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
            return
        # Observed only: a collection can run inside any code, logging's own included (a log line from
        # here failed on a closed stream at shutdown).
        by_generation[info["generation"]].observe(time.perf_counter() - started)

    gc.callbacks.append(_gc_timer)


def serve_metrics(port: int | None) -> None:
    """For a worker process (no HTTP server of its own): Prometheus' text on ``port``, from a thread."""
    if port is not None:
        start_http_server(port)


def setup_worker(*, service: str, log_level: str, metrics_port: int | None) -> None:
    """What a worker process (``vrs relay …``, ``vrs consume …``) does first: the same JSON log lines as the
    API processes, and its metrics on ``metrics_port`` (``VRS_<SERVICE>_METRICS_PORT``)."""
    configure_logging(log_level, service)
    serve_metrics(metrics_port)
    settle_heap()


def stop_on_signals() -> asyncio.Event:
    """An event a worker process's running loop sets on SIGTERM (Kubernetes stopping its pod) or SIGINT: the
    worker then finishes what it is doing and exits 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows' loop
            loop.add_signal_handler(sig, stop.set)
    return stop


def observe_outbox(service: str, shard: str, *, backlog: int, oldest: datetime | None) -> None:
    """Record one shard's outbox: how many events wait, and since when the oldest has waited."""
    OUTBOX_BACKLOG.labels(service, shard).set(backlog)
    if oldest is not None and oldest.tzinfo is None:  # SQLite hands datetimes back naive; they are UTC
        oldest = oldest.replace(tzinfo=UTC)
    age = 0.0 if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())
    OUTBOX_OLDEST_AGE.labels(service, shard).set(age)


def observe_consumer_lag(consumer: str, topic: str, *, positions: dict[int, int], ends: dict[int, int]) -> None:
    """Lag per partition: the bus's end offset minus the next offset the consumer will apply."""
    for partition, end in ends.items():
        CONSUMER_LAG.labels(consumer, topic, str(partition)).set(max(0, end - positions.get(partition, 0)))


def observe_event_ages(consumer: str, topic: str, occurred: Sequence[datetime]) -> None:
    now = datetime.now(UTC)
    histogram = EVENT_AGE.labels(consumer, topic)
    for at in occurred:
        histogram.observe(max(0.0, (now - at).total_seconds()))


class NotReady(Exception):
    """A readiness failure whose message is ours to show (``/readyz`` shows only the kind of any other)."""


class RedactMyNumber(logging.Filter):
    """Masks anything that looks like a My Number in a record's message (:mod:`shared.redaction`), before any
    handler or formatter sees the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_my_numbers(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


# The request being served: its id (X-Request-ID, as the gateway set it) for every log line it causes.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("vrs_request_id", default=None)
# A caller's request id is kept if it is short and plain; anything else is replaced.
REQUEST_ID_FORMAT = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the traceback is masked like the message (an exception's text can quote
    its input)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact_my_numbers(record.getMessage()),
            "service": self.service,
            "request_id": REQUEST_ID.get(),
        }
        if record.exc_info:
            entry["traceback"] = redact_my_numbers(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["traceback"] = redact_my_numbers(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact_my_numbers(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, service: str = "vrs") -> None:
    """JSON lines on stderr for the whole process, labelled with the first service configured in it: an app
    built on the side later (the gateway builds the services' apps for their OpenAPI) does not relabel it."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service))
    handler.addFilter(RedactMyNumber())
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Access logs print paths, and paths carry resident ids and coupon numbers: keep them off by default. httpx's
    # client logs every request's URL at INFO likewise (the CLIs' uploads, the harness's in-process clients).
    for name in ("uvicorn.access", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


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


class RequestIdMiddleware:
    """Pure ASGI: the request's ``X-Request-ID`` (or a new one) in :data:`REQUEST_ID` while it is served,
    in the scope's headers for the app (the gateway forwards it upstream), and on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"x-request-id"]
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        request_id = given if REQUEST_ID_FORMAT.fullmatch(given) else uuid.uuid4().hex
        scope = {**scope, "headers": [*headers, (b"x-request-id", request_id.encode())]}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                if b"x-request-id" not in names:
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())],
                    }
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


def _route_template(scope: Scope) -> str:
    # Set by the router on the scope it was given; the template keeps resident ids out of label values.
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))


def install_health(
    app: FastAPI,
    *,
    service: str,
    ready: Callable[[], Awaitable[None]],
    collect: Callable[[], Awaitable[None]] | None = None,
    collect_timeout: float = 2.0,
) -> None:
    """``/healthz`` (the process answers), ``/readyz`` (its dependencies answer) and ``/metrics``.

    ``collect`` samples gauges that are read from the databases (outbox backlog...) just before a scrape; if
    it fails or takes longer than ``collect_timeout`` the scrape still answers, with the previous values.
    """

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        try:
            await ready()
        except Exception as exc:
            # A driver's message may name hosts and ports: it goes to the log, the answer names only the kind.
            logging.getLogger(__name__).warning("not ready: %s: %s", type(exc).__name__, exc)
            detail = str(exc) if isinstance(exc, NotReady) else type(exc).__name__
            return JSONResponse({"error": "NotReady", "detail": detail}, status_code=503)
        return JSONResponse({"status": "ready", "service": service})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        if collect is not None:
            try:
                await asyncio.wait_for(collect(), timeout=collect_timeout)
            except Exception as exc:
                COLLECT_FAILURES.labels(service).inc()
                logging.getLogger(__name__).warning("metrics sampling failed (%s)", type(exc).__name__)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(MetricsMiddleware, service=service)
    # Added last, so it runs first: the request id is set before anything else logs.
    app.add_middleware(RequestIdMiddleware)
