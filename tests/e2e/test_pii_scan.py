"""No name or My Number leaves the services except where the contract returns it.

The end-to-end path runs with known names and My Numbers — residents registered, doses recorded and
counted, and the error paths most likely to echo input (bad My Numbers, spaced and dashed ones, unknown
fields, malformed JSON, another municipality's resident). Then every log line of every
service, every error body received, every /metrics text and every event on the bus (the embedded log's
file, or the Kafka topic) is searched for those names and numbers, whole, spaced (``1234 5678 9018``),
dashed (``1234-5678-9018``), JSON-escaped and URL-encoded. My Numbers are searched in successful bodies
too: the contract returns them masked only.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from devtools.launcher import Stack
from devtools.stack import BY_NAME, SERVICES
from shared.auth import Role
from shared.domain.codes import my_number_check_digit
from tests.e2e.test_walking_skeleton import (
    CHIYODA,
    CLINIC,
    MUNI,
    SAPPORO,
    bearer,
    count_in,
    dose_body,
    new_coupon_number,
    wait_for_count,
    wait_until_records_knows,
)

PEOPLE = [
    ("漏洩検査 一郎", "ロウエイケンサ イチロウ"),
    ("秘匿確認 花子", "ヒトクカクニン ハナコ"),
    ("個人情報 守", "コジンジョウホウ マモル"),
]


def new_my_number(rng: random.Random) -> str:
    body = f"{rng.randrange(10**10, 10**11):011d}"
    return body + str(my_number_check_digit(body))


def my_number_forms(number: str) -> list[str]:
    return [number, f"{number[:4]} {number[4:8]} {number[8:]}", f"{number[:4]}-{number[4:8]}-{number[8:]}"]


def text_forms(text: str) -> list[str]:
    """The text, each part of it, and how a careless serialiser would write them."""
    parts = [text, *(part for part in text.split() if len(part) >= 2)]
    return sorted({form for part in parts for form in (part, json.dumps(part)[1:-1], quote(part))})


class Scanner:
    def __init__(self, names: Iterable[str], my_numbers: Iterable[str]) -> None:
        self.names = [form for name in names for form in text_forms(name)]
        self.numbers = [form for number in my_numbers for form in my_number_forms(number)]
        self.findings: list[str] = []

    def scan(self, where: str, text: str, *, names: bool = True) -> None:
        for needle in [*self.numbers, *(self.names if names else [])]:
            if needle in text:
                line = next(line for line in text.splitlines() if needle in line)
                self.findings.append(f"{where}: {needle!r} in {line[:300]!r}")


@pytest.fixture
async def gw(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url(), timeout=30) as client:
        yield client


async def test_no_name_or_my_number_in_logs_errors_metrics_or_events(stack: Stack, gw: httpx.AsyncClient) -> None:
    rng = random.Random(uuid.uuid4().int)
    numbers = [new_my_number(rng) for _ in PEOPLE]
    scanner = Scanner([n for person in PEOPLE for n in person], numbers)
    request_id = f"pii-scan-{uuid.uuid4().hex}"
    traced = {"X-Request-ID": request_id}
    responses: list[httpx.Response] = []

    async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**traced, **kwargs.pop("headers", {})}
        response = await gw.request(method, path, headers=headers, **kwargs)
        responses.append(response)
        return response

    coupons = []
    for (name, kana), number in zip(PEOPLE, numbers, strict=True):
        coupon = new_coupon_number()
        coupons.append(coupon)
        resident = {"name": name, "name_kana": kana, "birth_date": "1960-01-02", "sex": "F", "my_number": number}
        path = f"/api/v1/municipalities/{CHIYODA}/residents/pii-{coupon}"
        r = await call("PUT", path, json=resident | {"coupon_number": coupon}, headers=MUNI)
        assert r.status_code == 201, r.text
        assert r.headers["x-request-id"] == request_id
        assert (await call("GET", path, headers=MUNI)).status_code == 200
        # Another municipality asks for the same resident: answered like an unknown one.
        assert (
            await call("GET", path, headers=bearer(role=Role.MUNICIPALITY, municipality=SAPPORO))
        ).status_code == 404

    name, kana = PEOPLE[0]
    base = f"/api/v1/municipalities/{CHIYODA}/residents/pii-bad-{coupons[0]}"
    good = {"name": name, "name_kana": kana, "birth_date": "1960-01-02", "sex": "F"}
    wrong_check_digit = numbers[0][:11] + str((int(numbers[0][11]) + 1) % 10)
    bad_requests: list[dict[str, Any]] = [
        {"json": good | {"my_number": form}} for form in my_number_forms(numbers[0])[1:]
    ] + [
        {"json": good | {"my_number": wrong_check_digit}},
        {"json": good | {"my_number": numbers[0], "note": f"{name} {numbers[0]}"}},  # an unknown field
        {"json": good | {"my_number": numbers[0], "sex": name}},  # a name where a code belongs
        {"json": good | {"my_number": numbers[0], "birth_date": numbers[0]}},
        {
            "content": f'{{"name": "{name}", "my_number": "{numbers[0]}", '.encode(),
            "headers": {"Content-Type": "application/json"},
        },
    ]
    for request in bad_requests:
        headers = {**MUNI, **request.pop("headers", {})}
        r = await call("PUT", base, headers=headers, **request)
        assert r.status_code == 422, r.text

    cut: dict[str, Any] = {"group_by": "date,municipality", "match": {"date": "2021-07-01", "municipality": CHIYODA}}
    before = await count_in(gw, **cut)
    for coupon in coupons:
        await wait_until_records_knows(gw, coupon)  # the resident reaches records through coupon-events
        r = await call(
            "POST",
            "/api/v1/doses",
            json=dose_body(coupon, on="2021-07-01"),
            headers={**CLINIC, "Idempotency-Key": str(uuid.uuid4())},
        )
        assert r.status_code == 201 and r.json()["status"] == "recorded", r.text
    # A coupon line whose check digit fails: the error names the field, and nothing else.
    r = await call(
        "POST",
        "/api/v1/doses",
        json=dose_body(coupons[0]) | {"coupon": f"11131017{coupons[0]}", "venue": name},
        headers={**CLINIC, "Idempotency-Key": str(uuid.uuid4())},
    )
    assert r.status_code == 422
    # Through to the statistics: the relay published and the consumer applied every event.
    await wait_for_count(gw, before + len(coupons), **cut)

    for response in responses:
        where = f"{response.request.method} {response.request.url.path} → {response.status_code}"
        scanner.scan(where, response.text, names=response.status_code >= 400)
    for service in SERVICES:
        metrics = await gw.get(f"{stack.url(service.name)}/metrics")
        assert metrics.status_code == 200
        if service.name == "records":  # sampled from the shards at scrape time
            assert 'vrs_outbox_backlog_events{service="records",shard="s0"}' in metrics.text
        if service.name == "records":  # its coupon consumers: the bus's end offsets against their positions
            assert 'vrs_consumer_lag_events{consumer="records-coupons-s0"' in metrics.text
        scanner.scan(f"/metrics of {service.name}", metrics.text)
    logs = sorted(stack.log_dir.glob("*.log"))
    assert {p.stem for p in logs} >= {s.name for s in SERVICES}
    not_json = []
    for log in logs:
        for lineno, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
            scanner.scan(f"{log.name}:{lineno}", line)
            if log.stem in BY_NAME and not _is_log_entry(line, service=log.stem):
                not_json.append(f"{log.name}:{lineno}: {line[:200]}")
    for where, payload in bus_payloads(stack):
        scanner.scan(where, payload)
    assert not scanner.findings, "\n".join(scanner.findings)
    assert not not_json, "log lines that are not one JSON entry:\n" + "\n".join(not_json[:20])


def _is_log_entry(line: str, *, service: str) -> bool:
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    keys = {"time", "level", "logger", "message", "service", "request_id"}
    return isinstance(entry, dict) and keys <= entry.keys() and entry["service"] == service


def test_the_scanner_finds_every_form() -> None:
    scanner = Scanner(["漏洩検査 一郎"], ["123456789018"])
    for text in [
        "x 123456789018 y",
        "1234 5678 9018",
        "id=1234-5678-9018",
        "漏洩検査",
        "\\u6f0f\\u6d29\\u691c\\u67fb",
        "%E4%B8%80%E9%83%8E",
    ]:
        scanner.scan("t", text)
    assert len(scanner.findings) == 6
    scanner.scan("ok", "coupon 111310160000012345, ********9018, 2021-06-01")
    assert len(scanner.findings) == 6


def bus_payloads(stack: Stack) -> Iterable[tuple[str, str]]:
    """Every event the run put on the bus, as text."""
    if stack.env.get("VRS_BUS_KIND", "embedded") == "embedded":
        log = Path(stack.env["VRS_VAR_DIR"]) / "events" / "log.db"
        for path in (log, log.with_name("log.db-wal")):
            if path.exists():
                yield str(path), path.read_bytes().decode("utf-8", errors="replace")
        return
    from kafka import KafkaConsumer, TopicPartition

    # Every topic the stack was configured with (dose events, and coupon events where there are).
    topics = {v for k, v in stack.env.items() if k.startswith("VRS_BUS_") and k.endswith("TOPIC")}
    consumer = KafkaConsumer(
        bootstrap_servers=stack.env["VRS_BUS_KAFKA_BOOTSTRAP_SERVERS"], group_id=None, enable_auto_commit=False
    )
    try:
        partitions = [
            TopicPartition(t, p) for t in sorted(topics) for p in sorted(consumer.partitions_for_topic(t) or [])
        ]
        assert partitions, f"no partitions for {topics}"
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            for tp, records in consumer.poll(timeout_ms=2000).items():
                for record in records:
                    value = (record.value or b"").decode("utf-8", errors="replace")
                    yield f"{tp.topic}[{tp.partition}]@{record.offset}", value
    finally:
        consumer.close()
