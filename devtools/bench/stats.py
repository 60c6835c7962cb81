"""``make bench`` (stats): Japan's busiest day, 2021-06-30 (1,253,104 doses), replayed from the published open
data through the public batch API on PostgreSQL + Kafka; freshness at a fixed rate; stats query latency with
one day and 94 days.

The system runs in production's shape: the four APIs, and the outbox relays and consumers as processes of
their own (``--in-process`` puts them back inside their services, the embedded default).

Each line of that day's ``prefecture.ndjson`` (prefecture × sex × age band × medical worker × dose number,
count) becomes that many doses: a dose of a registered resident of the right sex, born so that the age band
on the day is right, in the prefecture's own municipality code (PP000 + check digit); a ``U``/``UNK`` line
becomes doses of coupons nobody holds yet (``unmatched``); a line with only one of the two unknown (1,007 doses
that day) becomes doses of residents registered so (住基 sex code 9 with a birth date, or no birth date).
``--fraction`` replays that share of every line (rounded), so a run fits the machine; the doses/s measured
then tell how long the whole day would take.

The residents are registered first through registry's bulk import (``POST .../resident-imports``, CSV files
per municipality), and the replay starts once records' coupon projection holds every coupon (they travel as
coupon events): that setup is timed and printed apart. The replay's time runs from the first batch until the
public statistics count every dose. Printed: that time and doses/s, the batch API's own time, where the doses
were meanwhile (accepted, in records' outboxes, applied by stats), CPU per process, the accepted → applied
time from stats' histogram, whether the day's export lines equal the replayed ones, then a fixed-rate phase
(``--rate`` doses/s as batches of ``--rate-batch`` for ``--rate-seconds``) with its freshness from the same
histogram and from probe doses, and the query p50/p99 of the dashboard's requests with that day and with all
94 published days (those are loaded straight into stats' database as aggregates, not replayed).
``--profile DIR`` records each service process with py-spy during the replay and prints the top lines.

    python -m devtools.bench stats [--fraction 0.01] [--day 2021-06-30] [--clients 4] [--queries 200] [--keep]
        [--profile DIR] [--rate 1000] [--rate-seconds 30] [--rate-batch 50] [--in-process]
    python -m devtools.bench stats --queries-only [--day 2021-06-30] [--queries 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import aiohttp

from devtools.bench.core import (
    INSTITUTION,
    LOAD_FIRST_DAY,
    MUNICIPALITIES,
    PHASE_FIXED,
    CpuMeter,
    Lags,
    Prober,
    System,
    bearer,
    coupon_number,
    dose_doc,
    dump_logs,
    percentile,
    say,
    start_system,
)
from devtools.bench.profile import Profiles
from devtools.harness import scratch_directory
from shared.outbox import EVENTS_OF_ROW_SQL

OPENDATA = "opendata/prefecture-2021-07-15.ndjson"
BIRTH = {"-64": "1980-04-01", "65-": "1940-04-01", "UNK": ""}  # 41 and 81 on any day of 2021; unknown
QUERIES = [
    ("/api/v1/stats/doses", {"group_by": "date,dose_number"}),
    ("/api/v1/stats/doses", {"group_by": "age_band,sex,dose_number"}),
    ("/api/v1/stats/coverage", {}),
    ("/api/v1/stats/coverage", {"group_by": "prefecture"}),
]


def data_root() -> Path:
    override = os.environ.get("VRS_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def prefecture_municipality(prefecture: str) -> str:
    from shared.domain.codes import municipality_check_digit

    return f"{prefecture}000{municipality_check_digit(prefecture + '000')}"


@dataclass(frozen=True)
class Line:
    prefecture: str
    sex: str
    age: str
    medical_worker: bool
    dose: int
    count: int


def day_lines(path: Path, day: str) -> list[Line]:
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(raw)
        if r["date"] == day:
            out.append(Line(r["prefecture"], r["gender"], r["age"], r["medical_worker"], r["status"], r["count"]))
    return out


async def post_batches(
    session: aiohttp.ClientSession,
    gateway: str,
    docs: list[dict[str, object]],
    clients: int,
    pipeline: Pipeline | None = None,
) -> Counter[str]:
    from shared.auth import Role

    headers = bearer(role=Role.INSTITUTION, institution=INSTITUTION)
    chunks = iter([docs[i : i + 1000] for i in range(0, len(docs), 1000)])
    outcome: Counter[str] = Counter()

    async def worker() -> None:
        for chunk in chunks:
            for attempt in range(3):
                try:
                    async with session.post(
                        gateway + "/api/v1/doses/batch", json={"doses": chunk}, headers=headers
                    ) as r:
                        if r.status != 200:
                            outcome[f"HTTP {r.status} {(await r.read())[:160]!r}"] += len(chunk)
                            break
                        results = (await r.json())["results"]
                        for item in results:
                            outcome[item["status"]] += 1
                        if pipeline is not None:
                            pipeline.accepted += sum(item["status"] != "rejected" for item in results)
                        break
                except aiohttp.ServerDisconnectedError:
                    # A pooled connection the server closed as idle (uvicorn keeps them 5 s): send it again;
                    # the items' client_ids make a repeat record nothing twice.
                    if attempt == 2:
                        raise

    await asyncio.gather(*(worker() for _ in range(clients)))
    return outcome


@dataclass(frozen=True)
class Person:
    municipality: str
    resident_id: str
    sex: str
    birth_date: str
    coupon_number: str


def resident_csv(people: list[Person]) -> bytes:
    """A municipality's resident file, as the contract describes it."""
    lines = ["resident_id,name,name_kana,birth_date,sex,coupon_number\n"]
    lines += [f"{p.resident_id},統計 太郎,トウケイ タロウ,{p.birth_date},{p.sex},{p.coupon_number}\n" for p in people]
    return "".join(lines).encode()


# Rows per resident file: a large prefecture's residents come in several files, each well under the gateway's
# import body limit (32 MiB) and imported as its own job.
IMPORT_ROWS = 100_000


async def seed(session: aiohttp.ClientSession, gateway: str, people: list[Person]) -> None:
    """Register residents through registry's bulk import (``POST .../resident-imports``, CSV files per
    municipality) and wait until every import is done."""
    from shared.auth import Role

    files: list[tuple[str, bytes]] = []
    by_code: dict[str, list[Person]] = {}
    for person in people:
        by_code.setdefault(person.municipality, []).append(person)
    for code, rows in sorted(by_code.items(), key=lambda item: -len(item[1])):
        files += [(code, resident_csv(rows[i : i + IMPORT_ROWS])) for i in range(0, len(rows), IMPORT_ROWS)]
    queue = iter(files)
    problems: Counter[str] = Counter()

    async def worker() -> None:
        for code, body in queue:
            token = bearer(role=Role.MUNICIPALITY, municipality=code)
            url = f"{gateway}/api/v1/municipalities/{code}/resident-imports"
            async with session.post(url, data=body, headers={**token, "Content-Type": "text/csv"}) as r:
                if r.status != 202:
                    problems[f"POST {r.status} {(await r.read())[:160]!r}"] += 1
                    continue
                import_id = (await r.json())["import_id"]
            while True:
                async with session.get(f"{url}/{import_id}", headers=token) as r:
                    state = await r.json()
                if state.get("status") != "running":
                    break
                await asyncio.sleep(0.2)
            if state.get("status") != "done" or state.get("rows_failed"):
                problems[f"import {state.get('status')}: {str(state.get('errors'))[:200]}"] += 1

    # Two at a time: registry imports one file per task; more only queue on its two cores.
    await asyncio.gather(*(worker() for _ in range(2)))
    if problems:
        raise RuntimeError(f"seeding residents failed: {dict(problems)}")


async def metric_sum(session: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples on ``base``/metrics whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(base + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def stats_metrics(system: System) -> str:
    """Where the stats consumer's metrics are: its worker's port (production's shape), else the stats API."""
    port = system.env.get("VRS_STATS_METRICS_PORT")
    return f"http://127.0.0.1:{port}" if "stats-consumer" in system.stack.processes else system.stack.url("stats")


def shard_dsns(system: System, service: str) -> list[str]:
    """asyncpg DSNs of a sharded service's shard databases."""
    dsns = json.loads(system.env[f"VRS_{service.upper()}_SHARD_DSNS"]).values()
    return [dsn.replace("postgresql+asyncpg://", "postgresql://") for dsn in dsns]


async def coupons_learned(system: System, coupons: int, timeout: float = 3600) -> None:
    """Until records' coupon projection holds every seeded coupon (registry's relay and records' coupon
    consumers have carried them all over): counted in records' shard databases."""
    import asyncpg  # type: ignore[import-untyped]

    connections = [await asyncpg.connect(dsn) for dsn in shard_dsns(system, "records")]
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            known = 0
            for connection in connections:
                known += await connection.fetchval("SELECT count(*) FROM coupons")
            if known >= coupons:
                return
            await asyncio.sleep(0.5)
    finally:
        for connection in connections:
            await connection.close()
    raise RuntimeError("records did not learn the seeded coupons in time")


async def stats_day_total(session: aiohttp.ClientSession, gateway: str, day: str) -> int:
    from shared.auth import Role

    params = {"group_by": "date", "from": day, "to": day}
    async with session.get(gateway + "/api/v1/stats/doses", params=params, headers=bearer(role=Role.NATIONAL)) as r:
        rows = (await r.json())["rows"]
    return sum(int(row["count"]) for row in rows)


# Anonymous callers may send 50 requests a second from one address (the gateway's limit): stay under it.
QUERY_INTERVAL = 1 / 40


def anonymous_internal_headers() -> dict[str, str]:
    """What the gateway forwards for an anonymous caller (the dev key): to ask stats directly, without the hop."""
    from devtools.tokens import dev_gateway_issuer
    from shared.auth import ANONYMOUS

    return {"Authorization": dev_gateway_issuer().authorization(ANONYMOUS)}


async def query_latency(
    session: aiohttp.ClientSession, base: str, rounds: int, headers: dict[str, str] | None = None
) -> list[float]:
    times = []
    for i in range(rounds):
        path, params = QUERIES[i % len(QUERIES)]
        started = time.perf_counter()
        async with session.get(base + path, params=params, headers=headers) as r:
            await r.read()
            r.raise_for_status()
        took = time.perf_counter() - started
        times.append(took)
        await asyncio.sleep(max(0.0, QUERY_INTERVAL - took))
    return times


def published_cells(path: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(raw)
        rows.append(
            {
                "date": date.fromisoformat(r["date"]),
                "prefecture": r["prefecture"],
                "municipality": prefecture_municipality(r["prefecture"]),
                "sex": r["gender"],
                "age_band": r["age"],
                "age_band_10": "UNK",  # the open data has no birth dates
                "medical_worker": r["medical_worker"],
                "dose_number": r["status"],
                "vaccine": "moderna",  # beside the replayed day's pfizer cells, never on top of them
                "count": r["count"],
            }
        )
    return rows


async def load_days(system: System, path: Path, *, only: str | None = None, skip: str | None = None) -> int:
    """Published days (all 94, ``only`` that one, or all but ``skip``) straight into stats' aggregates, not
    replayed: the cells as the export has them (and the rollups refilled from them in the same transaction)."""
    from sqlalchemy import insert

    from services.stats.models import dose_counts
    from services.stats.repository import RollupRepository
    from shared.db import Database

    rows = await asyncio.to_thread(published_cells, path)
    if only is not None or skip is not None:
        rows = [r for r in rows if str(r["date"]) == only or (skip is not None and str(r["date"]) != skip)]
    database = Database.connect(system.env["VRS_STATS_MAIN_DSN"], pool_size=1)
    try:
        async with database.sessionmaker() as session, session.begin():
            for i in range(0, len(rows), 5000):
                await session.execute(insert(dose_counts), rows[i : i + 5000])
            await RollupRepository(session).refill()
    finally:
        await database.engine.dispose()
    return sum(int(str(r["count"])) for r in rows)


@dataclass
class Ages:
    """stats' accepted → applied histogram (``vrs_stats_event_lag_seconds``) as scraped: cumulative counts per
    upper bound."""

    buckets: dict[float, float]

    @property
    def count(self) -> float:
        return self.buckets.get(float("inf"), 0.0)

    def since(self, earlier: Ages) -> Ages:
        return Ages({le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()})

    def quantile(self, q: float) -> float:
        """Linear within the bucket, as Prometheus' histogram_quantile."""
        bounds = sorted(self.buckets)
        rank, lower, below = q * self.count, 0.0, 0.0
        for le in bounds:
            n = self.buckets[le]
            if n >= rank:
                if le == float("inf"):
                    return lower
                return lower + (le - lower) * ((rank - below) / (n - below) if n > below else 1.0)
            lower, below = le, n
        return float("nan")

    def bucket_of(self, q: float) -> float:
        """The upper bound of the bucket the ``q`` quantile falls in (what the histogram knows for sure)."""
        rank = q * self.count
        return next(le for le in sorted(self.buckets) if self.buckets[le] >= rank)

    def describe(self) -> str:
        if not self.count:
            return "no event applied"
        return (
            f"p50 {self.quantile(0.5) * 1000:6.0f} ms  p99 {self.quantile(0.99) * 1000:6.0f} ms "
            f"(p99 ≤ {self.bucket_of(0.99) * 1000:.0f} ms bucket; n={self.count:,.0f})"
        )


async def event_ages(session: aiohttp.ClientSession, stats: str) -> Ages:
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(stats + "/metrics") as r:
        text = await r.text()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vrs_stats_event_lag_seconds_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return Ages(buckets)


class Pipeline:
    """Where the replay's doses are, once a second: accepted by records (the answers so far), waiting in
    records' outboxes, applied by stats — and between those, on the bus. Says which stage falls behind."""

    def __init__(self, session: aiohttp.ClientSession, system: System) -> None:
        self.session = session
        self.stats = stats_metrics(system)
        self.shards = shard_dsns(system, "records")
        self.accepted = 0
        self.samples: list[tuple[float, int, int, int]] = []  # (seconds, accepted, in outboxes, applied)

    async def applied(self) -> int:
        return int(await metric_sum(self.session, self.stats, "vrs_stats_events_applied_total"))

    async def run(self, started: float, stop: asyncio.Event) -> None:
        import asyncpg

        connections = [await asyncpg.connect(dsn) for dsn in self.shards]
        base = await self.applied()
        try:
            while not stop.is_set():
                accepted = self.accepted
                waiting = 0
                for connection in connections:
                    waiting += await connection.fetchval(
                        f"SELECT coalesce(sum({EVENTS_OF_ROW_SQL}), 0) FROM outbox WHERE published_at IS NULL"
                    )
                applied = await self.applied() - base
                self.samples.append((time.monotonic() - started, accepted, waiting, applied))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            for connection in connections:
                await connection.close()

    def describe(self) -> str:
        if not self.samples:
            return "no sample"
        most_waiting = max(s[2] for s in self.samples)
        most_on_bus = max(max(0, a - w - d) for _, a, w, d in self.samples)
        step = max(1, len(self.samples) // 12)
        series = "  ".join(f"{t:.0f}s {a:,}/{w:,}/{d:,}" for t, a, w, d in self.samples[::step])
        return (
            f"most in records' outboxes {most_waiting:,}, most on the bus (published, not applied) "
            f"{most_on_bus:,}\n  accepted/in outboxes/applied: {series}"
        )


async def rebuild_rate(system: System) -> str:
    """How fast stats' consumer applies a backlog: ``vrs stats rebuild`` replays the whole topic from offset 0
    into shadow tables with the consumer's own code (5,000 messages a poll) and swaps them in."""
    say("vrs stats rebuild (the consumer's speed on a backlog) ...")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.cli", "stats", "rebuild", "--idle", "1",
        env=system.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    text = output.decode(errors="replace").strip()
    if process.returncode != 0:
        return f"stats rebuild           FAILED ({process.returncode}): {text[-300:]}"
    found = re.search(r"rebuilt from (\d+) events in ([\d.]+) s", text)
    if found is None:
        return f"stats rebuild           output not understood: {text[-300:]}"
    events, took = int(found.group(1)), float(found.group(2)) - 1  # less its final 1 s idle poll
    return (
        f"stats consumer capacity {events:,} events in {took:.1f} s = {events / took:,.0f} events/s (`vrs stats "
        f"rebuild`: the topic from offset 0 through the consumer's code into fresh tables, 5,000 a poll, and the "
        f"swap; {elapsed:.1f} s with the process's start and the last idle poll; its CPU "
        f"{cpu / max(1, events) * 1e6:.0f} µs an event, start included)"
    )


async def fixed_rate(session: aiohttp.ClientSession, system: System, args: argparse.Namespace) -> str:
    """Doses at a fixed rate, as small batches sent on a clock whatever the answers' pace (open loop), with
    sequential probes beside them; the accepted → applied time from stats' histogram, and the probes'
    accepted → visible in the public API."""
    from shared.auth import Role

    gateway, stats = system.gateway(), stats_metrics(system)
    headers = bearer(role=Role.INSTITUTION, institution=INSTITUTION)
    interval = args.rate_batch / args.rate
    batches = int(args.rate_seconds / interval)
    outcome: Counter[str] = Counter()
    latencies: list[float] = []
    say(f"fixed rate: {args.rate:,.0f} doses/s as {args.rate_batch} every {interval * 1000:.0f} ms for "
        f"{args.rate_seconds:.0f} s ...")  # fmt: skip

    async def send(b: int, due: float) -> None:
        docs = []
        for k in range(args.rate_batch):
            i = b * args.rate_batch + k
            municipality = MUNICIPALITIES[i % len(MUNICIPALITIES)]
            doc = dose_doc(municipality, coupon_number(PHASE_FIXED, i), LOAD_FIRST_DAY + timedelta(days=i % 300), i)
            docs.append({"client_id": f"fixed-{i}", **doc})
        async with session.post(gateway + "/api/v1/doses/batch", json={"doses": docs}, headers=headers) as r:
            if r.status != 200:
                outcome[f"HTTP {r.status} {(await r.read())[:160]!r}"] += len(docs)
                return
            for item in (await r.json())["results"]:
                outcome[item["status"]] += 1
        latencies.append(time.monotonic() - due)

    lags = Lags()
    prober = Prober(session, gateway, "stats-fixed")
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            await prober.probe(lags, poll_interval=0.01)
            await asyncio.sleep(0.1)

    before = await event_ages(session, stats)
    meter = CpuMeter({n: system.pids(n) for n in ("gateway", "records", "records-relay", "stats", "stats-consumer")})
    meter.add_group("postgres", system.pg_pids)
    meter.add_group("kafka", system.kafka_pids)
    meter.start()
    probing = asyncio.create_task(probe())
    in_flight: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    for b in range(batches):
        due = start + b * interval
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        task = asyncio.create_task(send(b, due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)
    sent_for = time.monotonic() - start
    done.set()
    await probing
    meter.stop()
    accepted = sum(n for status, n in outcome.items() if status in ("recorded", "needs_review", "unmatched"))
    deadline = time.monotonic() + 60
    ages = (await event_ages(session, stats)).since(before)
    while ages.count < accepted + prober.accepted and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        ages = (await event_ages(session, stats)).since(before)
    return "\n".join(
        [
            f"fixed rate             {accepted:,} doses in {sent_for:.1f} s = {accepted / sent_for:,.0f} doses/s "
            f"({args.rate_batch} per batch every {interval * 1000:.0f} ms); answers {dict(outcome)}",
            f"  batch latency        p50 {ms(latencies, 0.5)}  p99 {ms(latencies, 0.99)} (from when each was due)",
            f"  freshness            {ages.describe()} (stats' accepted → applied histogram; target p99 ≤ 1 s)",
            f"  probes               {lags.describe()} (201 → counted by the public stats API)",
            f"  {meter.line()}",
        ]
    )


def ms(values: list[float], q: float) -> str:
    return f"{percentile([v * 1000 for v in values], q):6.1f} ms"


async def measure_queries(system: System, args: argparse.Namespace) -> None:
    """Query latency only: the day's published cells loaded as aggregates (instead of replayed), then all 94."""
    gateway = system.gateway()
    source = data_root() / OPENDATA
    one = await load_days(system, source, only=args.day)
    timeout = aiohttp.ClientTimeout(total=600)
    stats, direct = system.stack.url("stats"), anonymous_internal_headers()
    groups = {"stats": system.pids("stats"), "gateway": system.pids("gateway"), "postgres": system.pg_pids}

    async def timed(base: str, headers: dict[str, str] | None = None) -> tuple[list[float], str]:
        """Latencies, and the CPU each query cost each process (CPU time does not wait on other jobs)."""
        meter = CpuMeter(dict(groups))
        meter.start()
        started = time.monotonic()
        times = await query_latency(session, base, args.queries, headers)
        elapsed = time.monotonic() - started
        meter.stop()
        cost = ", ".join(f"{g} {c * elapsed / len(times) * 1000:.1f}" for g, c in meter.cores.items() if c > 0.001)
        return times, f"CPU ms/query: {cost}"

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await query_latency(session, gateway, len(QUERIES))  # warm
        one_day, one_cpu = await timed(gateway)
        one_direct, one_direct_cpu = await timed(stats, direct)
        say("loading the other 93 published days into stats' database ...")
        loaded = await load_days(system, source, skip=args.day)
        await query_latency(session, gateway, len(QUERIES))  # warm
        all_days, all_cpu = await timed(gateway)
        all_direct, all_direct_cpu = await timed(stats, direct)
    print(f"queries, one day       p50 {ms(one_day, 0.5)}  p99 {ms(one_day, 0.99)}  {one_cpu}  ({one:,} doses)")
    print(f"queries, 94 days       p50 {ms(all_days, 0.5)}  p99 {ms(all_days, 0.99)}  {all_cpu}  (+{loaded:,})")
    print(f"  stats alone, one day p50 {ms(one_direct, 0.5)}  p99 {ms(one_direct, 0.99)}  {one_direct_cpu}")
    print(f"  stats alone, 94 days p50 {ms(all_direct, 0.5)}  p99 {ms(all_direct, 0.99)}  {all_direct_cpu}")
    ratio = percentile(all_days, 0.99) / percentile(one_day, 0.99)
    print(f"94 days / one day p99  {ratio:.2f}× (target ≤ 1.5×; query p99 target ≤ 20 ms)")


async def measure(system: System, args: argparse.Namespace) -> None:
    from services.stats.service import ndjson_line

    gateway = system.gateway()
    source = data_root() / OPENDATA
    lines = day_lines(source, args.day)
    replay = [(line, round(line.count * args.fraction)) for line in lines]
    replay = [(line, n) for line, n in replay if n > 0]
    total = sum(n for _, n in replay)
    say(f"{args.day}: {sum(x.count for x in lines):,} doses published; replaying {total:,} (fraction {args.fraction})")

    people: list[Person] = []
    docs: list[dict[str, object]] = []
    unmatched = 0
    for line, n in replay:
        code = prefecture_municipality(line.prefecture)
        for _ in range(n):
            if line.sex == "U" and line.age == "UNK":  # nobody known holds the coupon
                number = f"8{unmatched:09d}"
                unmatched += 1
            else:
                number = f"9{len(people):09d}"
                people.append(Person(code, f"bench-{len(people)}", line.sex, BIRTH[line.age], number))
            docs.append(
                {
                    "client_id": f"d{len(docs)}",
                    "coupon": f"1{line.dose}{code}{number}",
                    "dose_number": line.dose,
                    "vaccinated_on": args.day,
                    "vaccine": "pfizer",
                    "lot_number": "FA5765",
                    "medical_worker": line.medical_worker,
                }
            )
    stats = stats_metrics(system)
    groups = {
        "gateway": system.pids("gateway"),
        "records": system.pids("records"),
        "records-relay": system.pids("records-relay"),
        "stats": system.pids("stats"),
        "stats-consumer": system.pids("stats-consumer"),
        "coupon path": system.pids("registry", "registry-relay", "records-consumer"),
        "postgres": system.pg_pids,
        "kafka": system.kafka_pids,
        "bench": lambda: [os.getpid()],
    }
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.monotonic()
        await seed(session, gateway, people)
        imported = time.monotonic() - started
        say(f"imported {len(people):,} residents in {imported:.1f} s; waiting until records knows their coupons ...")
        await coupons_learned(system, len(people))
        seeding = time.monotonic() - started
        say(f"records knows every coupon {seeding:.1f} s after the first import; replaying ...")

        profiles = None
        if args.profile:
            names = ("gateway", "records", "records-relay", "stats", "stats-consumer")
            profiles = Profiles(
                Path(args.profile), {n: system.stack.processes[n].pid for n in names if n in system.stack.processes}
            )
            profiles.start()
        ages_before = await event_ages(session, stats)
        meter = CpuMeter(dict(groups))
        meter.start()
        pipeline, stop_sampling = Pipeline(session, system), asyncio.Event()
        started = time.monotonic()
        sampling = asyncio.create_task(pipeline.run(started, stop_sampling))
        outcome = await post_batches(session, gateway, docs, args.clients, pipeline)
        accepted = time.monotonic() - started
        deadline = time.monotonic() + 600
        seen = await stats_day_total(session, gateway, args.day)
        while seen < total and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # the stats API is the thing measured: poll it
            seen = await stats_day_total(session, gateway, args.day)
        elapsed = time.monotonic() - started
        meter.stop()
        stop_sampling.set()
        await sampling
        if profiles is not None:
            profiles.stop()
        replay_ages = (await event_ages(session, stats)).since(ages_before)

        async with session.get(gateway + "/api/v1/opendata/prefecture.ndjson") as r:
            exported = [x for x in (await r.text()).splitlines(keepends=True) if f'"date":"{args.day}"' in x]
        expected = [
            ndjson_line(
                day=date.fromisoformat(args.day),
                prefecture=line.prefecture,
                sex=line.sex,
                age_band=line.age,
                medical_worker=line.medical_worker,
                dose_number=line.dose,
                count=n,
            )
            for line, n in replay
        ]
        capacity = await rebuild_rate(system) if args.rebuild else None
        if capacity is not None:
            async with session.get(gateway + "/api/v1/opendata/prefecture.ndjson") as r:
                rebuilt = [x for x in (await r.text()).splitlines(keepends=True) if f'"date":"{args.day}"' in x]
            capacity += f"; export lines after the swap {'EQUAL' if rebuilt == expected else 'DIFFERENT'}"
        fixed = await fixed_rate(session, system, args) if args.rate_seconds > 0 else None
        one_day = await query_latency(session, gateway, args.queries)
        say("loading the 94 published days into stats' database ...")
        loaded = await load_days(system, source)
        await query_latency(session, gateway, len(QUERIES))  # warm
        all_days = await query_latency(session, gateway, args.queries)

    rate = total / elapsed if elapsed else float("nan")
    published = sum(x.count for x in lines)
    print(f"day replayed           {args.day}: {total:,} of {published:,} doses (fraction {args.fraction})")
    print(
        f"residents seeded       {len(people):,} by {len(people) // IMPORT_ROWS + 47} resident-imports in "
        f"{imported:.1f} s; records knew every coupon after {seeding:.1f} s (not part of the replay's time)"
    )
    print(f"answers                {dict(outcome)}")
    print(f"batch API accepted all {accepted:.1f} s, {total / accepted:,.0f} doses/s ({args.clients} clients × 1,000)")
    print(
        f"replay, all applied    {elapsed:.1f} s from the first batch until stats counted every dose: "
        f"{rate:,.0f} doses/s"
    )
    print(f"  stats show {seen:,} of {total:,}")
    if args.fraction < 1:
        print(f"whole day at that rate {1_253_104 / rate / 60:.1f} min (target ≤ 5 min)")
    else:
        print(f"whole day              {elapsed / 60:.1f} min (target ≤ 5 min)")
    print(f"freshness during load  {replay_ages.describe()} (stats' accepted → applied histogram)")
    print(f"  {meter.line()}")
    print(f"  {pipeline.describe()}")
    print(
        f"export lines           {'EQUAL' if exported == expected else 'DIFFERENT'} "
        f"({len(exported)} exported, {len(expected)} expected)"
    )
    if capacity is not None:
        print(capacity)
    if fixed is not None:
        print(fixed)
    print(f"queries, one day       p50 {ms(one_day, 0.5)}  p99 {ms(one_day, 0.99)}  (n={len(one_day)})")
    print(f"queries, 94 days       p50 {ms(all_days, 0.5)}  p99 {ms(all_days, 0.99)}  ({loaded:,} doses as aggregates)")
    if exported != expected:
        for a, b in zip(exported, expected, strict=False):
            if a != b:
                print(f"  first difference: exported {a.strip()}  expected {b.strip()}")
                break
    if profiles is not None:
        print("profiles of the replay (py-spy, top lines):")
        print(profiles.report())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devtools.bench stats")
    parser.add_argument("--day", default="2021-06-30")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of each line to replay (1 = the whole day)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent batch requests")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep logs and data")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="relays and consumers inside their services (the embedded default) instead of production's own processes",
    )
    parser.add_argument(
        "--no-rebuild", dest="rebuild", action="store_false", help="skip timing `vrs stats rebuild` after the replay"
    )
    parser.add_argument("--profile", metavar="DIR", help="py-spy each service during the replay into DIR")
    parser.add_argument("--rate", type=float, default=1000.0, help="doses/s of the fixed-rate (freshness) phase")
    parser.add_argument("--rate-seconds", type=float, default=30.0, help="length of that phase (0: none)")
    parser.add_argument("--rate-batch", type=int, default=50, help="doses per batch in that phase")
    parser.add_argument(
        "--queries-only", action="store_true", help="no replay: load the day's cells as aggregates, measure queries"
    )
    return parser.parse_args(argv)


def _terminate(signum: int, _: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        with scratch_directory("vrs-bench-stats-", keep=args.keep, say=say) as tmp, contextlib.ExitStack() as cleanup:
            from devtools.harness import free_port

            # The stats consumer's worker serves its metrics (the freshness histogram) here.
            env = {"VRS_STATS_METRICS_PORT": str(free_port())}
            system = start_system(tmp, cleanup, workers=not args.in_process, env=env)
            try:
                asyncio.run(measure_queries(system, args) if args.queries_only else measure(system, args))
            except BaseException:
                if dead := system.stack.exited():
                    say(f"services that died: {dead}")
                    dump_logs(system.stack.log_dir)
                raise
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
