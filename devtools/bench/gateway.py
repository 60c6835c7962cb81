"""Gateway overhead, measured: ``python -m devtools.bench gateway [--seconds 8] [--connections 32]``.

Starts a trivial upstream (FastAPI, one small JSON answer per route) and a gateway in front of it, both as
uvicorn processes (uvloop, httptools) like ``vrs run``; the gateway runs in full: identity tokens verified
(cached), the policy, the internal token, and the audit trail (an intent committed before forwarding, the
outcome after; batched, anchored) on PostgreSQL started for the bench (``--audit-db sqlite`` for SQLite) for
personal-data routes. The load comes from this process over raw keep-alive connections:

- **max rate**: closed loop, ``--connections`` connections, each sending again as soon as its answer is in;
- **fixed rate**: open loop at ``--rate`` requests/s spread over the connections; latency is measured from the
  moment each request was *due*, so a stall is not hidden (no coordinated omission).

Routes: ``POST /api/v1/doses`` (institution; audited: a dose is health data) and
``GET /api/v1/municipalities/{code}/residents/{id}`` (municipality; an audited read of personal data).
The load generator shares the machine's cores with the servers: compare the rows of one run. Each row also
shows the CPU each process group used while it was measured ("not ours": other jobs on the machine) and the
gateway's CPU per request, which stays comparable when other jobs take cores; ``--gateway-src DIR`` runs the
gateway of another checkout (``git archive <rev> | tar -x -C DIR``) to compare two versions on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import uvloop
from fastapi import FastAPI, Request, Response
from sqlalchemy import text
from yarl import URL

from devtools.bench.core import CpuMeter, children_of
from devtools.harness import free_port
from devtools.harness.postgres import PostgresServer
from devtools.tokens import bearer_headers
from shared.auth import Role
from shared.db import Database
from shared.migrations import SERVICES_DIR, upgrade

MIGRATIONS = SERVICES_DIR / "gateway" / "migrations" / "main"
BODY = (
    b'{"coupon":"111310160000000001","dose_number":1,"vaccinated_on":"2021-05-10",'
    b'"vaccine":"pfizer","lot_number":"EY1234"}'
)
ANSWER = b'{"dose_id":"d-0000000001","status":"recorded","findings":[]}'
RESIDENT = b'{"resident_id":"r-1","name":"x","doses":[]}'
DOSE_PATH = "/api/v1/doses"
READ_PATH = "/api/v1/municipalities/131016/residents/r-1"
STATS_PATH = "/api/v1/stats/doses"


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

    @app.get("/api/v1/stats/doses")
    async def stats() -> Response:
        return Response(b'{"as_of":null,"rows":[{"count":0}]}', status_code=200, media_type="application/json")

    @app.get("/api/v1/municipalities/{code}/residents/{resident_id}")
    async def resident(code: str, resident_id: str) -> Response:
        return Response(RESIDENT, status_code=200, media_type="application/json")

    return app


@contextlib.contextmanager
def uvicorn_process(
    target: str, port: int, env: dict[str, str], *, workers: int = 1, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", target, "--factory", "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
            "--workers", str(workers),
        ],
        env=env,
        cwd=cwd,
    )  # fmt: skip
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
        yield process
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
    cpu: dict[str, float] = field(default_factory=dict)  # cores used by each process group while measured
    audit: dict[str, float] = field(default_factory=dict)  # the gateway's audit counters over the run

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

    def __init__(
        self, request: bytes, result: Result, measure_from: float, stop: float, *, expect: int, interval: float = 0.0
    ) -> None:
        self.request, self.result, self.measure_from, self.stop = request, result, measure_from, stop
        self.expect = expect
        # 0: closed loop. Otherwise the next request is due ``interval`` after the previous one was due,
        # and its latency counts from then (open loop, no coordinated omission).
        self.interval = interval
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.sent_at = 0.0
        self.due = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but quacks alike
        self.due = time.perf_counter() + (random.random() * self.interval)
        self._schedule()

    def _schedule(self) -> None:
        delay = self.due - time.perf_counter()
        if self.interval and delay > 0:
            asyncio.get_running_loop().call_later(delay, self._send)
        else:
            self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        if not self.interval:
            self.due = self.sent_at
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
                self.result.errors += status != self.expect
                self.result.latencies.append(now - self.due)
            if now >= self.stop:
                assert self.transport is not None
                self.transport.close()
                return
            self.due += self.interval
            self._schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_result(None)


@dataclass(frozen=True)
class Target:
    method: str
    url: str
    headers: dict[str, str]
    expect: int
    body: bytes = b""


async def _load(target: Target, *, connections: int, seconds: float, warmup: float, rate: float = 0.0) -> Result:
    parsed = URL(target.url)
    host, port = parsed.host or "127.0.0.1", parsed.port or 80
    length = f"Content-Length: {len(target.body)}\r\n" if target.body else ""
    request = (
        f"{target.method} {parsed.raw_path_qs} HTTP/1.1\r\nHost: {host}:{port}\r\n{length}"
        + "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
        + "\r\n"
    ).encode() + target.body
    interval = connections / rate if rate else 0.0
    result = Result(0, 0, seconds, [])
    measure_from = time.perf_counter() + warmup
    stop = measure_from + seconds
    loop = asyncio.get_running_loop()
    protocols = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(
            lambda: _Connection(request, result, measure_from, stop, expect=target.expect, interval=interval),
            host,
            port,
        )
        protocols.append(protocol)
    await asyncio.gather(*(p.finished for p in protocols))
    return result


def run_load(
    target: Target, *, connections: int, seconds: float, rate: float = 0.0, meter: CpuMeter | None = None
) -> Result:
    # uvloop, like the servers: the load generator must not be the slowest process.
    warmup = min(2.0, seconds / 4)

    async def measured() -> Result:
        if meter is None:
            return await _load(target, connections=connections, seconds=seconds, warmup=warmup, rate=rate)
        task = asyncio.create_task(_load(target, connections=connections, seconds=seconds, warmup=warmup, rate=rate))
        await asyncio.sleep(warmup)
        meter.start()
        result = await task
        meter.stop()
        result.cpu = {**meter.cores, "not ours": meter.others}
        return result

    return uvloop.run(measured())


_AUDIT_METRICS = (
    "vrs_gateway_audit_entries_total",
    "vrs_gateway_audit_batch_seconds_count",
    "vrs_gateway_audit_batch_seconds_sum",
)


def audit_counters(gateway: str) -> dict[str, float]:
    """The gateway's audit counters from its /metrics (entries, batches, seconds spent storing them)."""

    async def scrape() -> str:
        async with aiohttp.ClientSession() as session, session.get(gateway + "/metrics") as response:
            return await response.text()

    found = {}
    for line in asyncio.run(scrape()).splitlines():
        name, _, value = line.partition(" ")
        if name in _AUDIT_METRICS:
            found[name] = float(value)
    return found


def audited(gateway: str, run: Callable[[], Result]) -> Result:
    before = audit_counters(gateway)
    result = run()
    after = audit_counters(gateway)
    result.audit = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in _AUDIT_METRICS}
    return result


def audit_entries(dsn: str) -> int:
    async def count() -> int:
        database = Database.connect(dsn, pool_size=1)
        try:
            async with database.engine.connect() as conn:
                return int((await conn.execute(text("SELECT count(*) FROM audit_trail"))).scalar_one())
        finally:
            await database.engine.dispose()

    return asyncio.run(count())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.bench.gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1000.0, help="the fixed rate of the latency comparison")
    parser.add_argument("--transport", default="raw", choices=["raw", "aiohttp", "httpx"])
    parser.add_argument(
        "--gateway-workers", type=int, default=1, help="uvicorn workers of the gateway (each its own audit chain)"
    )
    parser.add_argument(
        "--gateway-src",
        type=Path,
        help="run the gateway from this checkout instead (e.g. `git archive main`): before/after on one machine",
    )
    parser.add_argument(
        "--audit-db",
        default="postgres",
        choices=["postgres", "sqlite"],
        help="where the audit trail goes: PostgreSQL (production; a server started for the bench) or SQLite",
    )
    args = parser.parse_args(argv)

    dose_headers = {
        **bearer_headers(Role.INSTITUTION, institution="1312345678"),
        "Content-Type": "application/json",
        "Idempotency-Key": "bench",
    }
    read_headers = bearer_headers(Role.MUNICIPALITY, municipality="131016")
    upstream_port, gateway_port = free_port(), free_port()
    rows: list[tuple[str, Result]] = []
    with tempfile.TemporaryDirectory(prefix="vrs-gateway-bench-") as var, contextlib.ExitStack() as cleanup:
        env = {**os.environ, "VRS_VAR_DIR": var, "VRS_ENVIRONMENT": "development"}
        pg: PostgresServer | None = None
        if args.audit_db == "postgres":
            pg = PostgresServer(Path(var) / "postgres", free_port())
            pg.start()
            cleanup.callback(pg.stop)
            pg.create_database("gateway")
            dsn = pg.dsn("gateway")
        else:
            dsn = f"sqlite+aiosqlite:///{var}/gateway.db"
        upgrade(dsn, MIGRATIONS)
        upstream = f"http://127.0.0.1:{upstream_port}"
        gateway = f"http://127.0.0.1:{gateway_port}"
        gateway_env = {
            **env,
            "VRS_GATEWAY_MAIN_DSN": dsn,
            "VRS_GATEWAY_REGISTRY_URL": upstream,
            "VRS_GATEWAY_RECORDS_URL": upstream,
            "VRS_GATEWAY_STATS_URL": upstream,
            "VRS_GATEWAY_LOG_LEVEL": "WARNING",
            "VRS_GATEWAY_PROXY_TRANSPORT": args.transport,
            # The bench is one caller at full speed: its own rate limit must not be what is measured.
            "VRS_GATEWAY_RATE_PER_PRINCIPAL": "1000000",
            "VRS_GATEWAY_BURST_PER_PRINCIPAL": "1000000",
            **({"PYTHONPATH": str(args.gateway_src)} if args.gateway_src else {}),
        }
        direct_dose = Target("POST", upstream + DOSE_PATH, dose_headers, 201, BODY)
        gateway_dose = Target("POST", gateway + DOSE_PATH, dose_headers, 201, BODY)
        direct_read = Target("GET", upstream + READ_PATH, read_headers, 200)
        gateway_read = Target("GET", gateway + READ_PATH, read_headers, 200)
        with (
            uvicorn_process("devtools.bench.gateway:upstream_app", upstream_port, env) as upstream_proc,
            uvicorn_process(
                "services.gateway.app:create_app",
                gateway_port,
                gateway_env,
                workers=args.gateway_workers,
                cwd=args.gateway_src,
            ) as gateway_proc,
        ):
            meter = CpuMeter(
                {
                    "gateway": lambda: [gateway_proc.pid, *children_of(gateway_proc.pid)],
                    "upstream": lambda: [upstream_proc.pid],
                    "load": lambda: [os.getpid()],
                    "postgres": lambda: [] if pg is None or pg.pid is None else [pg.pid, *children_of(pg.pid)],
                }
            )
            load = {"connections": args.connections, "seconds": args.seconds, "meter": meter}
            before = audit_entries(dsn)
            rows.append(("dose, direct, max", run_load(direct_dose, **load)))
            rows.append(("dose, gateway, max", audited(gateway, lambda: run_load(gateway_dose, **load))))
            rows.append(("read, direct, max", run_load(direct_read, **load)))
            rows.append(("read, gateway, max", audited(gateway, lambda: run_load(gateway_read, **load))))
            # Not personal data: the same pipeline without the audit trail, to show what the audit costs.
            stats = Target("GET", gateway + STATS_PATH, read_headers, 200)
            rows.append(("stats, gateway, max", run_load(stats, **load)))
            fixed = {"connections": max(8, args.connections // 2), "seconds": args.seconds, "rate": args.rate}
            fixed["meter"] = meter
            rows.append((f"dose, direct, {args.rate:.0f}/s", run_load(direct_dose, **fixed)))
            rows.append(
                (f"dose, gateway, {args.rate:.0f}/s", audited(gateway, lambda: run_load(gateway_dose, **fixed)))
            )
            rows.append((f"read, direct, {args.rate:.0f}/s", run_load(direct_read, **fixed)))
            rows.append(
                (f"read, gateway, {args.rate:.0f}/s", audited(gateway, lambda: run_load(gateway_read, **fixed)))
            )
            audited_entries = audit_entries(dsn) - before

    load1, load5, _ = os.getloadavg()
    print(
        f"gateway workers: {args.gateway_workers}; audit trail on {args.audit_db}; "
        f"load average while measuring {load1:.1f} / {load5:.1f}"
    )
    print(
        f"{'load':<26}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}  "
        f"{'CPU (cores): gateway upstream load postgres not-ours':<54}{'gateway µs/req':>15}"
    )
    for name, r in rows:
        cpu = " ".join(f"{r.cpu.get(g, 0.0):.2f}" for g in ("gateway", "upstream", "load", "postgres", "not ours"))
        per_request = r.cpu.get("gateway", 0.0) * r.seconds / max(1, r.requests) * 1e6 if "gateway," in name else 0
        print(
            f"{name:<26}{r.rate:>8.0f}{r.percentile(0.5):>9.2f}{r.percentile(0.99):>9.2f}{r.errors:>7}  "
            f"{cpu:<54}{per_request:>15.0f}"
        )
    by = dict(rows)
    share = by["dose, gateway, max"].rate / by["dose, direct, max"].rate
    fixed_rows = [(k.split(",")[0], by[f"{k.split(',')[0]}, gateway, {args.rate:.0f}/s"]) for k in ("dose,", "read,")]
    print(f"audit entries written during the run: {audited_entries:,} (an intent and an outcome per dose or read)")
    for name, r in rows:
        if r.audit.get("vrs_gateway_audit_batch_seconds_count"):
            batches = r.audit["vrs_gateway_audit_batch_seconds_count"]
            print(
                f"  audit writer, {name}: {r.audit['vrs_gateway_audit_entries_total'] / batches:.1f} entries a batch, "
                f"{r.audit['vrs_gateway_audit_batch_seconds_sum'] / batches * 1000:.2f} ms to store one "
                f"(write + commit), {batches:,.0f} batches"
            )
    print(f"dose route, gateway max / direct max: {share:.0%} (target >= 70%)")
    for route, _ in fixed_rows:
        g, d = by[f"{route}, gateway, {args.rate:.0f}/s"], by[f"{route}, direct, {args.rate:.0f}/s"]
        print(
            f"{route} route at {args.rate:.0f}/s: added p50 {g.percentile(0.5) - d.percentile(0.5):.2f} ms, "
            f"added p99 {g.percentile(0.99) - d.percentile(0.99):.2f} ms (target <= 2 ms)"
        )
    print(f"audited reads through the gateway: {by['read, gateway, max'].rate:,.0f}/s (target >= 5,000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
