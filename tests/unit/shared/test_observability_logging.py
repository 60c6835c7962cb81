"""JSON log lines with the request id, My Numbers masked in messages and tracebacks, the request-id
middleware, and the outbox/consumer metric helpers."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from shared.observability import (
    REQUEST_ID,
    JsonFormatter,
    RedactMyNumber,
    configure_logging,
    install_health,
    observe_consumer_lag,
    observe_event_ages,
    observe_outbox,
    serve_metrics,
    setup_worker,
)

MY_NUMBER_FORMS = ["123456789018", "1234 5678 9018", "1234-5678-9018"]


@pytest.fixture
def log_lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("records"))
    handler.addFilter(RedactMyNumber())
    logger = logging.getLogger("vrs.test.json")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, stream
    logger.handlers[:] = []


def _entries(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line_with_the_request_id(log_lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = log_lines
    logger.info("outside a request")
    token = REQUEST_ID.set("req-42")
    try:
        logger.warning("dose %s recorded\nsecond line", "d-1")
    finally:
        REQUEST_ID.reset(token)
    first, second = _entries(stream)
    assert first["request_id"] is None and first["message"] == "outside a request"
    assert second == {
        "time": second["time"],
        "level": "WARNING",
        "logger": "vrs.test.json",
        "message": "dose d-1 recorded\nsecond line",
        "service": "records",
        "request_id": "req-42",
    }
    assert datetime.fromisoformat(str(second["time"])).tzinfo is not None


@pytest.mark.parametrize("form", MY_NUMBER_FORMS)
def test_my_numbers_are_masked_in_message_and_traceback(
    form: str, log_lines: tuple[logging.Logger, io.StringIO]
) -> None:
    logger, stream = log_lines
    try:
        raise ValueError(f"no resident with my_number={form}")
    except ValueError:
        logger.exception("lookup of %s failed", form)
    text = stream.getvalue()
    # Only the last four digits are left (shared.redaction), in the message and in the traceback.
    assert form not in text and "5678" not in text
    (entry,) = _entries(stream)
    assert entry["message"] == "lookup of ********9018 failed"
    assert "ValueError: no resident with my_number=********9018" in str(entry["traceback"])


def test_other_numbers_are_kept(log_lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = log_lines
    logger.info("coupon 111310160000012345 municipality 131016 date 2021-06-01")
    assert _entries(stream)[0]["message"] == "coupon 111310160000012345 municipality 131016 date 2021-06-01"


def _app() -> FastAPI:
    app = FastAPI()

    async def ready() -> None:
        return None

    async def collect() -> None:
        raise RuntimeError("database down")

    install_health(app, service="unit", ready=ready, collect=collect)

    @app.get("/whoami")
    async def whoami() -> dict[str, str | None]:
        return {"request_id": REQUEST_ID.get()}

    return app


async def test_request_id_is_kept_or_replaced_and_returned() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        kept = await client.get("/whoami", headers={"X-Request-ID": "gw-123"})
        assert kept.json() == {"request_id": "gw-123"} and kept.headers["x-request-id"] == "gw-123"
        for bad in (None, "has space", "x" * 129):
            headers = {} if bad is None else {"X-Request-ID": bad}
            fresh = await client.get("/whoami", headers=headers)
            new_id = fresh.json()["request_id"]
            assert new_id and new_id != bad and fresh.headers["x-request-id"] == new_id
    assert REQUEST_ID.get() is None


async def test_metrics_answer_when_a_sampler_fails() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert REGISTRY.get_sample_value("vrs_metrics_collect_failures_total", {"service": "unit"}) >= 1  # type: ignore[operator]


def test_outbox_and_consumer_helpers() -> None:
    observe_outbox("records", "s9", backlog=7, oldest=datetime.now(UTC) - timedelta(seconds=30))
    assert REGISTRY.get_sample_value("vrs_outbox_backlog_events", {"service": "records", "shard": "s9"}) == 7
    age = REGISTRY.get_sample_value("vrs_outbox_oldest_unpublished_seconds", {"service": "records", "shard": "s9"})
    assert age is not None and 29 <= age < 40
    observe_outbox("records", "s9", backlog=0, oldest=None)
    assert (
        REGISTRY.get_sample_value("vrs_outbox_oldest_unpublished_seconds", {"service": "records", "shard": "s9"}) == 0
    )

    observe_consumer_lag("unit", "t", positions={0: 5, 1: 10}, ends={0: 8, 1: 10, 2: 4})
    lag = {
        p: REGISTRY.get_sample_value("vrs_consumer_lag_events", {"consumer": "unit", "topic": "t", "partition": p})
        for p in "012"
    }
    assert lag == {"0": 3, "1": 0, "2": 4}

    observe_event_ages("unit", "t", [datetime.now(UTC) - timedelta(seconds=2)])
    assert REGISTRY.get_sample_value("vrs_consumer_event_age_seconds_count", {"consumer": "unit", "topic": "t"}) == 1


def test_a_worker_logs_json_and_serves_its_metrics_on_the_configured_port() -> None:
    from devtools.harness import free_port

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    port = free_port()
    try:
        root.handlers[:] = []  # a fresh process
        setup_worker(service="records-relay", log_level="INFO", metrics_port=port)
        serve_metrics(None)  # not configured: nothing is started
        (handler,) = root.handlers
        assert isinstance(handler.formatter, JsonFormatter) and handler.formatter.service == "records-relay"
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert response.status_code == 200 and "vrs_outbox_backlog_events" in response.text
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_the_first_service_configured_labels_the_process() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        root.handlers[:] = []
        configure_logging("INFO", "gateway")
        configure_logging("INFO", "stats")  # e.g. the gateway building stats' app for its OpenAPI
        (handler,) = root.handlers
        assert isinstance(handler.formatter, JsonFormatter) and handler.formatter.service == "gateway"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_request_urls_are_not_logged_at_info(capsys: pytest.CaptureFixture[str]) -> None:
    """Paths name residents (``/municipalities/131016/residents/R1``): neither the server's access log nor
    httpx's client writes them at the default level."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    app = FastAPI()

    @app.get("/municipalities/{code}/residents/{resident_id}")
    async def resident(code: str, resident_id: str) -> dict[str, str]:
        return {"resident_id": resident_id}

    try:
        root.handlers[:] = []
        configure_logging("INFO", "registry")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://registry") as client:
            assert (await client.get("/municipalities/131016/residents/R1")).status_code == 200
        logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET /municipalities/131016/residents/R1"')
        logging.getLogger("vrs.test").info("still logged")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "still logged" in err and "R1" not in err
