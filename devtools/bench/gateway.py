"""Gateway overhead, measured: ``python -m devtools.bench gateway [--seconds 8] [--max-connections 32,64,128]
[--upstream trivial|records|both] [--only ROW] [--py-spy DIR]``.

Two upstreams (``--upstream both``, the default):

- **trivial** (FastAPI, one small fixed JSON answer per route): what the gateway itself costs per request, next
  to an upstream that costs ~100 µs;
- **records** (``dose→records`` rows): the dose route as deployed — the records service on PostgreSQL (two
  shards; its outbox relay and coupon consumer, processes of their own in production, are not started), called
  directly with an internal token and through the gateway with an identity token; every request a new dose (a
  coupon nobody holds yet, its own idempotency key), so records does the full work each time. Its fixed-rate
  rows run at ``--rate`` or half of records' direct max, whichever is lower.

Upstreams and gateways are uvicorn processes (uvloop, httptools) like ``vrs run``; the gateway runs in full:
identity tokens verified (cached), the policy, the internal token, and the audit trail (for the dose: an intent
committed before forwarding, the outcome after; for the read: one entry committed before the answer goes out;
batched, anchored) on PostgreSQL started for the bench (``--audit-db
sqlite`` for SQLite) for personal-data routes. The load comes from this process over raw keep-alive connections:

- **max rate**: closed loops, each connection sending again as soon as its answer is in, at each of
  ``--max-connections`` (32, 64, 128) connections; the best rate is the row's (each count's rate is printed too);
- **fixed rate**: open loop at ``--rate`` requests/s spread over the connections; latency is measured from the
  moment each request was *due*, so a stall is not hidden (no coordinated omission).

Routes: ``POST /api/v1/doses`` (institution; audited: a dose is health data) and
``GET /api/v1/municipalities/{code}/residents/{id}`` (municipality; an audited read of personal data).
The load generator shares the machine's cores with the servers: compare the rows of one run. Each row also
shows the CPU each process group used while it was measured ("not ours": other jobs on the machine) and the
gateway's CPU per request, which stays comparable when other jobs take cores; ``--gateway-src DIR`` runs the
gateway of another checkout (``git archive <rev> | tar -x -C DIR``) to compare two versions on one machine.
``--rounds N`` runs the max rows and the fixed-rate rows as N alternating direct/gateway pairs each and prints the
medians (of the max ratio, of the added p50 and p99): one pair moves with the machine's other jobs; ``--only`` runs
the rows whose name contains a word; ``--py-spy DIR`` records the gateway with py-spy during each
gateway row and prints the functions with most samples; ``--quiet-wait S`` waits (up to S seconds) before each row
until other jobs use fewer than ``--quiet-cores``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import uvloop
from fastapi import FastAPI, Request, Response
from sqlalchemy import text
from yarl import URL

from devtools.bench.core import UNLIMITED_CALLER, CpuMeter, children_of, wait_quiet
from devtools.harness import free_port
from devtools.harness.postgres import PostgresServer, production_pg_settings
from devtools.tokens import bearer_headers, dev_gateway_issuer
from services.gateway.server import UVICORN_OPTIONS
from shared.auth import Principal, Role
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
    target: str,
    port: int,
    env: dict[str, str],
    *,
    workers: int = 1,
    cwd: Path | None = None,
    options: tuple[str, ...] = ("--http", "httptools"),
) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", target, "--factory", "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", *options, "--no-access-log", "--log-level", "warning",
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


def gateway_options(src: Path | None) -> tuple[str, ...]:
    """uvicorn's options for the gateway as deployed (``services/gateway/server.py``), or plain httptools for an
    older checkout (``--gateway-src``) that has no such protocol."""
    if (src or Path(__file__).resolve().parents[2]).joinpath("services", "gateway", "server.py").exists():
        return tuple(UVICORN_OPTIONS)
    return ("--http", "httptools")


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
    statuses: Counter[int] = field(default_factory=Counter)  # of the answers that were not the expected one
    sweep: dict[int, float] = field(default_factory=dict)  # a max row: req/s at each number of connections tried

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
        self,
        request: Callable[[], bytes],
        result: Result,
        measure_from: float,
        stop: float,
        *,
        expect: int,
        interval: float = 0.0,
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
        self.transport.write(self.request())

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
                if status != self.expect:
                    self.result.errors += 1
                    self.result.statuses[status] += 1
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
    # A new dose each time (records would answer a repeated one as a replay): the next (body, Idempotency-Key).
    vary: Callable[[], tuple[bytes, str]] | None = None

    def requests(self) -> Callable[[], bytes]:
        """What each connection sends next: the same bytes, or the next of a numbered series."""
        parsed = URL(self.url)
        host, port = parsed.host or "127.0.0.1", parsed.port or 80
        head = f"{self.method} {parsed.raw_path_qs} HTTP/1.1\r\nHost: {host}:{port}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in self.headers.items()
        )
        vary = self.vary
        if vary is None:
            length = f"Content-Length: {len(self.body)}\r\n" if self.body else ""
            fixed = (head + length + "\r\n").encode() + self.body
            return lambda: fixed

        def numbered() -> bytes:
            body, key = vary()
            return f"{head}Content-Length: {len(body)}\r\nIdempotency-Key: {key}\r\n\r\n".encode() + body

        return numbered


async def _load(target: Target, *, connections: int, seconds: float, warmup: float, rate: float = 0.0) -> Result:
    parsed = URL(target.url)
    host, port = parsed.host or "127.0.0.1", parsed.port or 80
    request = target.requests()
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


def run_max(target: Target, *, sweep: Sequence[int], seconds: float, meter: CpuMeter | None = None) -> Result:
    """A route's max rate: the best of closed loops at each number of connections in ``sweep``.

    At one number of connections a closed loop measures the rate its latency allows, not the route's max. The gateway
    adds latency (the intent's commit before forwarding), so at 32 connections the gateway row was bound by waiting
    while the machine still had room; each side gets the count that suits it best."""
    best: Result | None = None
    rates: dict[int, float] = {}
    for connections in sweep:
        result = run_load(target, connections=connections, seconds=seconds, meter=meter)
        rates[connections] = result.rate
        if best is None or result.rate > best.rate:
            best = result
    assert best is not None, "an empty sweep"
    best.sweep = rates
    return best


_AUDIT_METRICS = (
    "vrs_gateway_audit_entries_total",
    "vrs_gateway_audit_batch_seconds_count",
    "vrs_gateway_audit_batch_seconds_sum",
    *(
        f'vrs_gateway_audit_wait_seconds_{part}{{entry="{entry}"}}'
        for entry in ("intent", "read")
        for part in ("count", "sum")
    ),
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


def _waited(audit: dict[str, float]) -> str:
    """What a request waited for its own entry, on average: an intent before it was forwarded, a read's entry
    before its answer left."""
    out = ""
    for entry, what in (("intent", "an intent"), ("read", "a read's entry")):
        count = audit.get(f'vrs_gateway_audit_wait_seconds_count{{entry="{entry}"}}', 0.0)
        if count:
            total = audit[f'vrs_gateway_audit_wait_seconds_sum{{entry="{entry}"}}']
            out += f"; {what} waited {total / count * 1000:.2f} ms"
    return out


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


SHARDS = ("s0", "s1")


def records_env(pg: PostgresServer) -> dict[str, str]:
    """Records on the bench's PostgreSQL (two shards), as production runs its API processes: the outbox relay
    and the coupon consumer are processes of their own (not started here: the dose route does not wait for
    them)."""
    return {
        "VRS_RECORDS_MAIN_DSN": pg.dsn("records_main"),
        "VRS_RECORDS_SHARD_DSNS": json.dumps({s: pg.dsn(f"records_{s}") for s in SHARDS}),
        "VRS_RECORDS_RUN_RELAY": "false",
        "VRS_RECORDS_RUN_CONSUMER": "false",
        "VRS_RECORDS_RUN_IMPORTS": "false",
        "VRS_RECORDS_LOG_LEVEL": "WARNING",
    }


def setup_records(pg: PostgresServer) -> None:
    for name in ("records_main", *(f"records_{s}" for s in SHARDS)):
        pg.create_database(name)
    upgrade(pg.dsn("records_main"), SERVICES_DIR / "records" / "migrations" / "main")
    for s in SHARDS:
        upgrade(pg.dsn(f"records_{s}"), SERVICES_DIR / "records" / "migrations" / "shard")


def new_doses(tag: str, series: int) -> Callable[[], tuple[bytes, str]]:
    """Each call: a dose for a coupon nobody holds yet (records accepts it as 'unmatched'; ``series``, a digit,
    keeps the coupons of two targets apart), and its idempotency key."""
    municipalities = ("131016", "011002", "271004", "401307", "472018")
    serial = itertools.count()

    def dose() -> tuple[bytes, str]:
        n = next(serial)
        body = (
            f'{{"coupon":"11{municipalities[n % 5]}{series}{n:09d}","dose_number":1,"vaccinated_on":"2021-05-10",'
            f'"vaccine":"pfizer","lot_number":"EY{n % 10000:04d}"}}'
        )
        return body.encode(), f"{tag}-{n}"

    return dose


@dataclass
class Profiler:
    """``py-spy record`` of the gateway while one row is measured: raw stacks in ``directory``, top lines printed."""

    directory: Path
    pid: Callable[[], int]
    summaries: list[tuple[str, list[str]]] = field(default_factory=list)

    def around(self, name: str, run: Callable[[], Result], seconds: float) -> Result:
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.directory / (name.replace(", ", "_").replace("/", "").replace(" ", "_") + ".txt")
        spy = Path(sys.executable).with_name("py-spy")
        warmup = min(2.0, seconds / 4)
        # Started during the load's warm-up, so that it samples the measured window only.
        recorder = subprocess.Popen(
            ["sh", "-c", f'sleep {warmup + 0.2}; exec "$0" "$@"', str(spy), "record", "--nonblocking", "-r", "250",
             "-f", "raw", "-d", str(max(1, int(seconds - 0.5))), "-p", str(self.pid()), "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            return run()
        finally:
            recorder.wait(timeout=seconds + 30)
            self.summaries.append((name, top_lines(out) if out.exists() else ["(py-spy recorded nothing)"]))


def top_lines(raw: Path, count: int = 14) -> list[str]:
    """py-spy's raw (collapsed) stacks → the functions with most samples on CPU: own (self) and with callees."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]  # fmt: skip
        samples += int(n)
        own[frames[-1]] += int(n)
        for frame in set(frames):
            total[frame] += int(n)
    lines = [f"{samples} samples; own %   total %   function (file)"]
    for frame, hits in own.most_common(count):
        lines.append(f"  {hits / samples:>6.1%}  {total[frame] / samples:>7.1%}   {frame}")
    return lines


def _round(k: int) -> str:
    """The suffix of a max row's name in round ``k`` (from 0): none in the first."""
    return f" ({k + 1})" if k else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.bench.gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--connections", type=int, default=32, help="the fixed-rate rows spread their requests over half this many"
    )
    parser.add_argument(
        "--max-connections",
        type=lambda v: [int(c) for c in v.split(",")],
        default=[32, 64, 128],
        help="the max rows: a closed loop at each of these numbers of connections (comma-separated), the best kept",
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="the fixed rate of the latency comparison")
    parser.add_argument(
        "--upstream",
        default="both",
        choices=["trivial", "records", "both"],
        help="what the dose route reaches: a trivial app (the gateway's own cost), the records service on "
        "PostgreSQL (the route as deployed), or both",
    )
    parser.add_argument(
        "--only", action="append", default=[], help="run only the rows whose name contains this (repeatable)"
    )
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="before each row, wait until other jobs use fewer cores than this (see --quiet-wait)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=0.0, help="wait at most this many seconds for that (0: do not wait)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each route's direct and gateway rows (max and fixed rate) this many times, alternating, and "
        "print the medians: a machine whose other jobs come and go then weighs on both sides alike",
    )
    parser.add_argument("--py-spy", type=Path, help="record the gateway with py-spy during each gateway row, here")
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
    with_records = args.upstream in ("records", "both")
    with_trivial = args.upstream in ("trivial", "both")

    dose_headers = {
        **bearer_headers(Role.INSTITUTION, institution="1312345678"),
        "Content-Type": "application/json",
        "Idempotency-Key": "bench",
    }
    read_headers = bearer_headers(Role.MUNICIPALITY, municipality="131016")
    upstream_port, gateway_port, records_port, records_gateway_port = free_port(), free_port(), free_port(), free_port()
    rows: list[tuple[str, Result]] = []
    profiles: list[tuple[str, list[str]]] = []
    with tempfile.TemporaryDirectory(prefix="vrs-gateway-bench-") as var, contextlib.ExitStack() as cleanup:
        env = {**os.environ, "VRS_VAR_DIR": var, "VRS_ENVIRONMENT": "development"}
        pg: PostgresServer | None = None
        if args.audit_db == "postgres" or with_records:
            pg = PostgresServer(Path(var) / "postgres", free_port(), settings=production_pg_settings())
            pg.start()
            cleanup.callback(pg.stop)
        if args.audit_db == "postgres":
            assert pg is not None
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
            **UNLIMITED_CALLER,
            **({"PYTHONPATH": str(args.gateway_src)} if args.gateway_src else {}),
        }
        direct_dose = Target("POST", upstream + DOSE_PATH, dose_headers, 201, BODY)
        gateway_dose = Target("POST", gateway + DOSE_PATH, dose_headers, 201, BODY)
        direct_read = Target("GET", upstream + READ_PATH, read_headers, 200)
        gateway_read = Target("GET", gateway + READ_PATH, read_headers, 200)
        stats = Target("GET", gateway + STATS_PATH, read_headers, 200)
        direct_stats = Target("GET", upstream + STATS_PATH, read_headers, 200)
        gateways: dict[str, subprocess.Popen[bytes]] = {}
        records_rate = per_s = f"{args.rate:.0f}/s"
        groups: dict[str, Callable[[], list[int]]] = {
            "gateway": lambda: [p for g in gateways.values() for p in (g.pid, *children_of(g.pid))],
            "upstream": lambda: [],
            "load": lambda: [os.getpid()],
            "postgres": lambda: [] if pg is None or pg.pid is None else [pg.pid, *children_of(pg.pid)],
        }
        meter = CpuMeter(groups)
        spy = Profiler(args.py_spy, lambda: 0) if args.py_spy else None
        before = audit_entries(dsn)

        def add(name: str, run: Callable[[], Result], *, via: str | None = None) -> None:
            if args.only and not any(o in name for o in args.only):
                return
            if args.quiet_wait:
                # The servers are idle between rows: whatever is busy now is another job on the machine.
                asyncio.run(wait_quiet(args.quiet_cores, args.quiet_wait))
            if via is not None:
                run_audited = run
                run = lambda: audited(via, run_audited)  # noqa: E731
                if spy is not None:
                    spy.pid = lambda: gateways[via].pid
                    counted = run
                    run = lambda: spy.around(name, counted, args.seconds)  # noqa: E731
            rows.append((name, run()))

        def max_pairs(
            route: str, direct_run: Callable[[], Result], gateway_run: Callable[[], Result], via: str
        ) -> None:
            for k in range(args.rounds):
                add(f"{route}, direct, max{_round(k)}", direct_run)
                add(f"{route}, gateway, max{_round(k)}", gateway_run, via=via)

        load = {"sweep": args.max_connections, "seconds": args.seconds, "meter": meter}
        fixed = {"connections": max(8, args.connections // 2), "seconds": args.seconds, "rate": args.rate}
        fixed["meter"] = meter
        if with_trivial:
            with (
                uvicorn_process("devtools.bench.gateway:upstream_app", upstream_port, env) as upstream_proc,
                uvicorn_process(
                    "services.gateway.app:create_app",
                    gateway_port,
                    gateway_env,
                    workers=args.gateway_workers,
                    cwd=args.gateway_src,
                    options=gateway_options(args.gateway_src),
                ) as gateway_proc,
            ):
                gateways[gateway] = gateway_proc
                groups["upstream"] = lambda: [upstream_proc.pid]
                max_pairs("dose", lambda: run_max(direct_dose, **load), lambda: run_max(gateway_dose, **load), gateway)
                max_pairs("read", lambda: run_max(direct_read, **load), lambda: run_max(gateway_read, **load), gateway)
                # Not personal data: the same pipeline without the audit trail, to show what the audit costs.
                add("stats, gateway, max", lambda: run_max(stats, **load), via=gateway)
                for k in range(args.rounds):
                    add(f"dose, direct, {per_s}{_round(k)}", lambda: run_load(direct_dose, **fixed))
                    add(f"dose, gateway, {per_s}{_round(k)}", lambda: run_load(gateway_dose, **fixed), via=gateway)
                    add(f"read, direct, {per_s}{_round(k)}", lambda: run_load(direct_read, **fixed))
                    add(f"read, gateway, {per_s}{_round(k)}", lambda: run_load(gateway_read, **fixed), via=gateway)
                    # The same pipeline without an audit entry to commit: what the gateway adds by itself.
                    add(f"stats, direct, {per_s}{_round(k)}", lambda: run_load(direct_stats, **fixed))
                    add(f"stats, gateway, {per_s}{_round(k)}", lambda: run_load(stats, **fixed), via=gateway)
                gateways.clear()
        if with_records:
            assert pg is not None
            setup_records(pg)
            records = f"http://127.0.0.1:{records_port}"
            records_gateway = f"http://127.0.0.1:{records_gateway_port}"
            internal = {
                "Authorization": dev_gateway_issuer().authorization(
                    Principal.named(Role.INSTITUTION, institution="1312345678")
                ),
                "Content-Type": "application/json",
            }
            identity = {k: v for k, v in dose_headers.items() if k != "Idempotency-Key"}
            with (
                uvicorn_process("services.records.app:create_app", records_port, {**env, **records_env(pg)}) as rec,
                uvicorn_process(
                    "services.gateway.app:create_app",
                    records_gateway_port,
                    {**gateway_env, "VRS_GATEWAY_RECORDS_URL": records},
                    workers=args.gateway_workers,
                    cwd=args.gateway_src,
                    options=gateway_options(args.gateway_src),
                ) as records_gateway_proc,
            ):
                gateways[records_gateway] = records_gateway_proc
                groups["upstream"] = lambda: [rec.pid]
                tag = f"gb{int(time.time())}"
                direct = Target("POST", records + DOSE_PATH, internal, 201, vary=new_doses(tag + "d", 7))
                through = Target("POST", records_gateway + DOSE_PATH, identity, 201, vary=new_doses(tag + "g", 8))
                max_pairs(
                    "dose→records", lambda: run_max(direct, **load), lambda: run_max(through, **load), records_gateway
                )
                # The fixed rate, unless records cannot carry it: then half its max, so that the row measures the
                # gateway's added latency rather than a queue in front of an overloaded service.
                done = dict(rows)
                maxima = [
                    r.rate for k in range(args.rounds) if (r := done.get("dose→records, direct, max" + _round(k)))
                ]
                direct_max = statistics.median(maxima) if maxima else 0
                rate = min(args.rate, direct_max / 2) if direct_max else args.rate
                slower = {**fixed, "rate": rate}
                for k in range(args.rounds):
                    add(f"dose→records, direct, {rate:.0f}/s{_round(k)}", lambda: run_load(direct, **slower))
                    add(
                        f"dose→records, gateway, {rate:.0f}/s{_round(k)}",
                        lambda: run_load(through, **slower),
                        via=records_gateway,
                    )
                records_rate = f"{rate:.0f}/s"
                gateways.clear()
        audited_entries = audit_entries(dsn) - before
        if spy is not None:
            profiles = spy.summaries

    load1, load5, _ = os.getloadavg()
    print(
        f"gateway workers: {args.gateway_workers}; audit trail on {args.audit_db}; "
        f"load average while measuring {load1:.1f} / {load5:.1f}"
    )
    print(
        f"{'load':<32}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}  "
        f"{'CPU (cores): gateway upstream load postgres not-ours':<54}{'gateway µs/req':>15}"
    )
    for name, r in rows:
        cpu = " ".join(f"{r.cpu.get(g, 0.0):.2f}" for g in ("gateway", "upstream", "load", "postgres", "not ours"))
        per_request = r.cpu.get("gateway", 0.0) * r.seconds / max(1, r.requests) * 1e6 if "gateway," in name else 0
        print(
            f"{name:<32}{r.rate:>8.0f}{r.percentile(0.5):>9.2f}{r.percentile(0.99):>9.2f}{r.errors:>7}  "
            f"{cpu:<54}{per_request:>15.0f}"
        )
    for name, r in rows:
        if len(r.sweep) > 1:
            tried = ", ".join(f"{c} → {rate:,.0f}" for c, rate in r.sweep.items())
            print(f"  {name}, req/s by connections: {tried}")
    for name, r in rows:
        if r.statuses:
            print(f"  unexpected answers, {name}: " + ", ".join(f"{n:,} x {s}" for s, n in sorted(r.statuses.items())))
    by = dict(rows)
    print(f"audit entries written during the run: {audited_entries:,} (intent + outcome per dose, one per read)")
    for name, r in rows:
        # Each uvicorn worker keeps its own counters and /metrics answers from whichever worker takes the
        # connection: differences of two readings mean something with one worker only.
        if args.gateway_workers == 1 and r.audit.get("vrs_gateway_audit_batch_seconds_count"):
            batches = r.audit["vrs_gateway_audit_batch_seconds_count"]
            print(
                f"  audit writer, {name}: {r.audit['vrs_gateway_audit_entries_total'] / batches:.1f} entries a batch, "
                f"{r.audit['vrs_gateway_audit_batch_seconds_sum'] / batches * 1000:.2f} ms to store one "
                f"(write + commit), {batches:,.0f} batches"
                + _waited(r.audit)
                + (" (every load of its sweep)" if len(r.sweep) > 1 else "")
            )
    for route, label in (
        ("dose→records", "dose route (records on PostgreSQL)"),
        ("dose", "dose route (trivial upstream)"),
    ):
        ratios = [
            g.rate / d.rate
            for k in range(args.rounds)
            if (g := by.get(f"{route}, gateway, max{_round(k)}")) and (d := by.get(f"{route}, direct, max{_round(k)}"))
        ]
        if ratios:
            pairs = f" (median of {len(ratios)} alternating pairs: {', '.join(f'{r:.0%}' for r in ratios)})"
            print(
                f"{label}, gateway max / direct max: {statistics.median(ratios):.0%}"
                f"{pairs if len(ratios) > 1 else ''} (target >= 70%)"
            )
    for route in ("dose→records", "dose", "read", "stats"):
        at = records_rate if route == "dose→records" else per_s
        added = [
            (g.percentile(0.5) - d.percentile(0.5), g.percentile(0.99) - d.percentile(0.99))
            for k in range(args.rounds)
            if (g := by.get(f"{route}, gateway, {at}{_round(k)}"))
            and (d := by.get(f"{route}, direct, {at}{_round(k)}"))
        ]
        if added:
            p50, p99 = statistics.median(a[0] for a in added), statistics.median(a[1] for a in added)
            pairs = f" (median of {len(added)} alternating pairs: {', '.join(f'{a[1]:.2f}' for a in added)})"
            print(
                f"{route} route at {at}: added p50 {p50:.2f} ms, added p99 {p99:.2f} ms"
                f"{pairs if len(added) > 1 else ''}"
                + (" (not audited: the gateway's own share)" if route == "stats" else " (target <= 2 ms)")
            )
    reads = [x.rate for k in range(args.rounds) if (x := by.get(f"read, gateway, max{_round(k)}"))]
    if reads:
        more = f" (median of {len(reads)} rounds; best {max(reads):,.0f}/s)" if len(reads) > 1 else ""
        print(f"audited reads through the gateway: {statistics.median(reads):,.0f}/s{more} (target >= 5,000)")
    for name, lines in profiles:
        print(f"py-spy, gateway, {name}: " + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
