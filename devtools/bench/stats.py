"""``make bench`` (stats): Japan's busiest day, 2021-06-30 (1,253,104 doses), replayed from the published open
data through the public batch API on PostgreSQL + Kafka, and stats query latency with one day and 94 days.

Each line of that day's ``prefecture.ndjson`` (prefecture × sex × age band × medical worker × dose number,
count) becomes that many doses: a dose of a registered resident of the right sex, born so that the age band
on the day is right, in the prefecture's own municipality code (PP000 + check digit); a ``U``/``UNK`` line
becomes doses of coupons nobody holds yet (``unmatched``). Lines whose cell the API cannot produce (sex
unknown but age known, a known sex with unknown age: 1,007 doses that day) are left out and said so.
``--fraction`` replays that share of every line (rounded), so a run fits the machine; the doses/s measured
then tell how long the whole day would take. Printed: elapsed time, doses/s, freshness during the replay
(a probe dose's 201 until the public statistics count it, p50/p99), whether the day's export lines equal
the replayed ones, and query p50/p99 of the dashboard's requests with that day and with all 94 published
days (those are loaded straight into stats' database as aggregates, not replayed).

    python -m devtools.bench stats [--fraction 0.01] [--day 2021-06-30] [--clients 4] [--queries 200] [--keep]
    python -m devtools.bench stats --queries-only [--day 2021-06-30] [--queries 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import aiohttp

from devtools.bench.core import (
    INSTITUTION,
    CpuMeter,
    Lags,
    Prober,
    System,
    bearer,
    dump_logs,
    percentile,
    say,
    start_system,
)
from devtools.harness import scratch_directory

OPENDATA = "opendata/prefecture-2021-07-15.ndjson"
BIRTH = {"-64": "1980-04-01", "65-": "1940-04-01"}  # 41 and 81 on any day of 2021
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


def reproducible(line: Line) -> bool:
    return (line.sex == "U") == (line.age == "UNK")


async def post_batches(
    session: aiohttp.ClientSession, gateway: str, docs: list[dict[str, object]], clients: int
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
                        for item in (await r.json())["results"]:
                            outcome[item["status"]] += 1
                        break
                except aiohttp.ServerDisconnectedError:
                    # A pooled connection the server closed as idle (uvicorn keeps them 5 s): send it again;
                    # the items' client_ids make a repeat record nothing twice.
                    if attempt == 2:
                        raise

    await asyncio.gather(*(worker() for _ in range(clients)))
    return outcome


async def seed(session: aiohttp.ClientSession, gateway: str, people: list[tuple[str, str, str, str]]) -> None:
    """PUT residents (municipality, resident id, sex, birth date) with coupon number = their index."""
    from shared.auth import Role

    tokens: dict[str, dict[str, str]] = {}
    queue = iter(enumerate(people))
    problems: Counter[str] = Counter()

    async def worker() -> None:
        for n, (code, rid, sex, birth) in queue:
            token = tokens.setdefault(code, bearer(role=Role.MUNICIPALITY, municipality=code))
            body = {"name": "統計 太郎", "name_kana": "トウケイ タロウ", "birth_date": birth, "sex": sex}
            body["coupon_number"] = f"9{n:09d}"
            async with session.put(
                f"{gateway}/api/v1/municipalities/{code}/residents/{rid}", json=body, headers=token
            ) as r:
                if r.status not in (200, 201):
                    problems[f"{r.status} {(await r.read())[:160]!r}"] += 1

    await asyncio.gather(*(worker() for _ in range(16)))
    if problems:
        raise RuntimeError(f"seeding residents failed: {dict(problems)}")


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
    left_out = sum(line.count for line in lines if not reproducible(line))
    replay = [(line, round(line.count * args.fraction)) for line in lines if reproducible(line)]
    replay = [(line, n) for line, n in replay if n > 0]
    total = sum(n for _, n in replay)
    say(f"{args.day}: {sum(x.count for x in lines):,} doses published; replaying {total:,} (fraction {args.fraction})")

    people: list[tuple[str, str, str, str]] = []
    docs: list[dict[str, object]] = []
    unmatched = 0
    for line, n in replay:
        code = prefecture_municipality(line.prefecture)
        for _ in range(n):
            if line.sex == "U":
                number = f"8{unmatched:09d}"
                unmatched += 1
            else:
                number = f"9{len(people):09d}"
                people.append((code, f"bench-{len(people)}", line.sex, BIRTH[line.age]))
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
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.monotonic()
        await seed(session, gateway, people)
        seeding = time.monotonic() - started
        say(f"seeded {len(people):,} residents in {seeding:.1f} s; letting records learn their coupons ...")
        await asyncio.sleep(5)

        lags = Lags()
        prober = Prober(session, gateway, "stats-bench")
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                await prober.probe(lags, poll_interval=0.02)
                await asyncio.sleep(0.2)

        probing = asyncio.create_task(probe())
        started = time.monotonic()
        outcome = await post_batches(session, gateway, docs, args.clients)
        accepted_at = time.monotonic()
        done.set()
        await probing
        elapsed = accepted_at - started
        deadline = time.monotonic() + 300
        seen = await stats_day_total(session, gateway, args.day)
        while seen < total and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the stats API is the thing measured: poll it
            seen = await stats_day_total(session, gateway, args.day)
        visible = time.monotonic() - started

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
        one_day = await query_latency(session, gateway, args.queries)
        say("loading the 94 published days into stats' database ...")
        loaded = await load_days(system, source)
        await query_latency(session, gateway, len(QUERIES))  # warm
        all_days = await query_latency(session, gateway, args.queries)

    rate = total / elapsed if elapsed else float("nan")
    published = sum(x.count for x in lines)
    print(f"day replayed           {args.day}: {total:,} of {published:,} doses (fraction {args.fraction})")
    print(f"left out               {left_out:,} doses in cells the API cannot produce (U with an age, M/F without)")
    print(f"residents seeded       {len(people):,} in {seeding:.1f} s")
    print(f"batch API              {elapsed:.1f} s, {rate:,.0f} doses/s ({args.clients} clients × 1,000 per request)")
    print(f"answers                {dict(outcome)}")
    print(f"all counted            {visible:.1f} s after the first batch (stats show {seen:,} of {total:,})")
    print(f"whole day at that rate {1_253_104 / rate / 60:.1f} min (target ≤ 5 min)")
    print(f"freshness during load  {lags.describe()}")
    print(
        f"export lines           {'EQUAL' if exported == expected else 'DIFFERENT'} "
        f"({len(exported)} exported, {len(expected)} expected)"
    )
    print(f"queries, one day       p50 {ms(one_day, 0.5)}  p99 {ms(one_day, 0.99)}  (n={len(one_day)})")
    print(f"queries, 94 days       p50 {ms(all_days, 0.5)}  p99 {ms(all_days, 0.99)}  ({loaded:,} doses as aggregates)")
    if exported != expected:
        for a, b in zip(exported, expected, strict=False):
            if a != b:
                print(f"  first difference: exported {a.strip()}  expected {b.strip()}")
                break


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devtools.bench stats")
    parser.add_argument("--day", default="2021-06-30")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of each line to replay (1 = the whole day)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent batch requests")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep logs and data")
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
            system = start_system(tmp, cleanup)
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
