"""Gateway overhead, measured: ``python -m devtools.bench gateway [--seconds 10] [--connections 32]``.

Starts a trivial upstream (FastAPI, one small JSON answer) and, one after another, gateways in front of it
on each transport, all as uvicorn processes (uvloop, httptools) like ``vrs run``; drives each with the same
closed-loop load from this process; prints requests/s and latency percentiles. The load generator shares
the machine's cores with the servers, so compare the rows of one run, not numbers across machines.

The request is the hot path: ``POST /api/v1/doses`` with an institution token and a small JSON body,
which the gateway forwards without an audit entry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import aiohttp
import uvloop
from fastapi import FastAPI, Request, Response
from yarl import URL

from devtools.harness import free_port
from devtools.tokens import bearer_headers
from shared.auth import Role
from shared.migrations import SERVICES_DIR, upgrade

MIGRATIONS = SERVICES_DIR / "gateway" / "migrations" / "main"
BODY = (
    b'{"coupon":"111310160000000001","dose_number":1,"vaccinated_on":"2021-05-10",'
    b'"vaccine":"pfizer","lot_number":"EY1234"}'
)
ANSWER = b'{"dose_id":"d-0000000001","status":"recorded","findings":[]}'


def upstream_app() -> FastAPI:
    """The trivial upstream: reads the body, answers 201 with a fixed small JSON."""
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/v1/doses")
    async def dose(request: Request) -> Response:
        await request.body()
        return Response(ANSWER, status_code=201, media_type="application/json")

    return app


@contextlib.contextmanager
def uvicorn_process(target: str, port: int, env: dict[str, str]) -> Iterator[None]:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", target, "--factory", "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
        ],
        env=env,
    )  # fmt: skip
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
        yield
    finally:
        process.terminate()
        process.wait(timeout=15)


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    async def poll() -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"{url}: the server exited with {process.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{url} did not become healthy in {timeout} s")

    asyncio.run(poll())


@dataclass
class Result:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000 if ordered else float("nan")


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending the same request again as soon as the answer is in (like wrk).

    A bare protocol rather than an HTTP client: the load generator shares the cores with the servers, and
    a client library would spend more CPU per request than the gateway under test.
    """

    def __init__(self, request: bytes, result: Result, measure_from: float, stop: float) -> None:
        self.request, self.result, self.measure_from, self.stop = request, result, measure_from, stop
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but quacks alike
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            if at < 0:
                raise RuntimeError("the benchmark reads only answers with a Content-Length")
            length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
            if len(self.buffer) < end + 4 + length:
                return
            status = int(head[9:12])
            self.buffer = self.buffer[end + 4 + length :]
            now = time.perf_counter()
            if self.sent_at >= self.measure_from:
                self.result.requests += 1
                self.result.errors += status != 201
                self.result.latencies.append(now - self.sent_at)
            if now >= self.stop:
                assert self.transport is not None
                self.transport.close()
                return
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_result(None)


async def _load(url: str, headers: dict[str, str], *, connections: int, seconds: float, warmup: float) -> Result:
    parsed = URL(url)
    host, port = parsed.host or "127.0.0.1", parsed.port or 80
    request = (
        f"POST {parsed.raw_path_qs} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(BODY)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    ).encode() + BODY
    result = Result(0, 0, seconds, [])
    measure_from = time.perf_counter() + warmup
    stop = measure_from + seconds
    loop = asyncio.get_running_loop()
    protocols = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(lambda: _Connection(request, result, measure_from, stop), host, port)
        protocols.append(protocol)
    await asyncio.gather(*(p.finished for p in protocols))
    return result


def run_load(url: str, headers: dict[str, str], *, connections: int, seconds: float) -> Result:
    # uvloop, like the servers: the load generator must not be the slowest process.
    return uvloop.run(_load(url, headers, connections=connections, seconds=seconds, warmup=min(2.0, seconds / 5)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.bench.gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="cycle through the variants this often; medians")
    parser.add_argument(
        "--variants",
        default="direct,aiohttp,aiohttp-no-token-cache,httpx",
        help="comma-separated: direct, aiohttp, aiohttp-no-token-cache, httpx",
    )
    args = parser.parse_args(argv)
    variants = args.variants.split(",")

    headers = {
        **bearer_headers(Role.INSTITUTION, institution="1312345678"),
        "Content-Type": "application/json",
        "Idempotency-Key": "bench",
    }
    upstream_port, gateway_port = free_port(), free_port()
    results: dict[str, list[Result]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="vrs-gateway-bench-") as var:
        env = {**os.environ, "VRS_VAR_DIR": var, "VRS_ENVIRONMENT": "development"}
        dsn = f"sqlite+aiosqlite:///{var}/gateway.db"
        upgrade(dsn, MIGRATIONS)
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        gateway_env = {
            **env,
            "VRS_GATEWAY_MAIN_DSN": dsn,
            "VRS_GATEWAY_REGISTRY_URL": upstream_url,
            "VRS_GATEWAY_RECORDS_URL": upstream_url,
            "VRS_GATEWAY_STATS_URL": upstream_url,
            "VRS_GATEWAY_LOG_LEVEL": "WARNING",
        }
        with uvicorn_process("devtools.bench.gateway:upstream_app", upstream_port, env):
            # Interleaved rounds: a neighbour's burst of load hits every variant alike.
            for _ in range(args.rounds):
                for variant in variants:
                    if variant == "direct":
                        url = f"{upstream_url}/api/v1/doses"
                        results[variant].append(
                            run_load(url, headers, connections=args.connections, seconds=args.seconds)
                        )
                        continue
                    transport, _, option = variant.partition("-")
                    extra = {"VRS_GATEWAY_PROXY_TRANSPORT": transport}
                    if option == "no-token-cache":
                        extra["VRS_GATEWAY_TOKEN_CACHE_SIZE"] = "0"  # noqa: S105 - a size, not a secret
                    with uvicorn_process("services.gateway.app:create_app", gateway_port, {**gateway_env, **extra}):
                        url = f"http://127.0.0.1:{gateway_port}/api/v1/doses"
                        results[variant].append(
                            run_load(url, headers, connections=args.connections, seconds=args.seconds)
                        )

    def median(runs: list[Result]) -> Result:
        return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]

    direct = median(results["direct"]) if results.get("direct") else None
    print(f"{'variant':<24}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}{'of direct':>11}")
    for name, runs in results.items():
        result = median(runs)
        share = f"{result.rate / direct.rate:.0%}" if direct and direct.requests else ""
        print(
            f"{name:<24}{result.rate:>10.0f}{result.percentile(0.5):>10.1f}{result.percentile(0.99):>10.1f}"
            f"{result.errors:>8}{share:>11}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
