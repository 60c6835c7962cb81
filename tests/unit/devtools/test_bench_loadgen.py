"""The records bench's load generator against a small server of the test's own: every request it sends is
answered and counted once, errors included, in a closed loop and at a fixed rate; a server that cannot be
reached shows as errors, not as a crash or a silent gap."""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

import pytest
from aiohttp import web

from devtools.bench.core import PHASE_SINGLE, LoadSpec, _loadgen


class Pipe:
    """The generator's end of the pipe to the bench: what it sends, kept."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def send(self, message: tuple[str, Any]) -> None:
        self.sent.append(message)


class Clinic:
    """Answers every 7th dose 503 and the rest 201; keeps what came in."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.content_types: Counter[str] = Counter()
        self.answered: Counter[int] = Counter()

    async def dose(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert body["coupon"]  # the body arrived whole
        self.keys.append(request.headers["Idempotency-Key"])
        self.content_types[request.headers["Content-Type"]] += 1
        status = 503 if len(self.keys) % 7 == 0 else 201
        self.answered[status] += 1
        if status == 503:
            return web.json_response({"error": "Unavailable", "detail": "try again"}, status=503)
        return web.json_response({"dose_id": len(self.keys), "status": "recorded"}, status=201)


@pytest.fixture
async def clinic() -> Any:
    served = Clinic()
    app = web.Application()
    app.router.add_post("/api/v1/doses", served.dose)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield served, f"http://127.0.0.1:{port}/api/v1/doses"
    await runner.cleanup()


def single(url: str, **changes: Any) -> LoadSpec:
    fields: dict[str, Any] = {
        "name": "single", "url": url, "headers": {"Authorization": "Bearer t"}, "kind": "single",
        "concurrency": 4, "warmup": 0.2, "duration": 0.6, "phase": PHASE_SINGLE, "tag": "t",
    }  # fmt: skip
    return LoadSpec(**(fields | changes))


async def test_closed_loop_counts_every_answer_once(clinic: tuple[Clinic, str]) -> None:
    served, url = clinic
    pipe = Pipe()
    result = await _loadgen(single(url), pipe)  # type: ignore[arg-type]
    assert pipe.sent[0][0] == "started"
    assert result.requests == len(served.keys) > 20
    assert len(set(served.keys)) == len(served.keys)  # an idempotency key of its own for every dose
    assert served.content_types == {"application/json": result.requests}
    assert result.errors == served.answered[503]
    assert sum(result.error_samples.values()) == result.errors
    assert all(sample.startswith("503 ") for sample in result.error_samples)
    assert result.statuses == {"recorded": served.answered[201]}
    assert result.accepted_total == served.answered[201]
    assert len(result.latencies) == result.ok_in_window > 0
    assert len(result.timeline) == result.requests


async def test_fixed_rate_sends_what_the_rate_asks_whatever_the_answers(clinic: tuple[Clinic, str]) -> None:
    served, url = clinic
    result = await _loadgen(single(url, rate=250.0, warmup=0.2, duration=0.8), Pipe())  # type: ignore[arg-type]
    assert result.requests == len(served.keys) == 250  # due at i / 250 s for i < 250: one second's worth
    assert result.errors == served.answered[503] == 250 // 7


async def test_a_server_that_cannot_be_reached_shows_as_errors() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = single(f"http://127.0.0.1:{port}/api/v1/doses", rate=50.0, warmup=0.0, duration=0.4)
    result = await _loadgen(spec, Pipe())  # type: ignore[arg-type]
    assert result.requests == result.errors == 20
    assert result.ok_in_window == 0
    assert all(sample.startswith("-1 UpstreamUnreachable") for sample in result.error_samples)
    assert not result.statuses
