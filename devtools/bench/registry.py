"""``make bench`` registry part, on PostgreSQL with 2 shards (the harness; no Kafka: the relay is off and the
coupon events wait in the outbox, which the import writes all the same).

1. Import of a generated 住基-style cp932 CSV of ``--residents`` rows (default 1,000,000) through registry's
   own importer (validation, AES-GCM sealing, keyed hash, directory, coupons + events, history), in
   residents/s, beside a raw ``COPY`` of the same file into a plain table in the same run (columns all text,
   and typed as the CSV's values are).
2. Transfer lookups, single and batch of 1,000, p50/p99: registry in-process, records served over HTTP.
3. records' coupon projection look-up (``ProjectionRepository.get``) p50/p99 at 10k and at 1M coupons.
4. The certificate revocation sweep over ``--certificates`` issued cards (default 100,000, two doses each, 1%
   with a dose since voided in records): a pass in cards/s, its records calls, and a pass with nothing changed.

5. ``vrs shards move`` of the imported municipality (registry's residents, coupons, history, outbox; records'
   rows of it, the sweep's doses included) from s0 to s1: the write pause per service and the whole move's
   time (``--no-move`` skips it).

``--only sweep`` runs part 4 alone; ``--only import`` runs part 1 alone (the import and the raw ``COPY``).
PostgreSQL runs with production's memory and WAL parameters (``deploy/k8s``; ``--pg-defaults``: its own), as in
the records bench; before the look-ups, what the imports left dirty in the page cache is written to disk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import uvicorn

from devtools.bench.core import (
    CpuMeter,
    children_of,
    describe_write_back,
    percentile,
    pg_defaults_option,
    pg_parameters_line,
    say,
    write_back,
)
from devtools.harness import free_port
from devtools.harness.postgres import PostgresServer, production_pg_settings
from devtools.tokens import dev_gateway_issuer
from services.records.app import create_app as create_records
from services.records.models import shard_assignments as records_shards
from services.records.models import shard_moves as records_moves
from services.records.repository import MOVABLE_TABLES as RECORDS_TABLES
from services.records.repository import ProjectionRepository
from services.records.settings import RecordsSettings
from services.registry import certificates
from services.registry.app import create_app as create_registry
from services.registry.models import shard_assignments as registry_shards
from services.registry.models import shard_moves as registry_moves
from services.registry.repository import MOVABLE_TABLES as REGISTRY_TABLES
from services.registry.settings import RegistrySettings
from shared.auth import Principal, Role
from shared.db import SHARD_MAP_TTL_SECONDS, Databases, utcnow
from shared.domain.codes import my_number_check_digit
from shared.internal import InternalClient
from shared.migrations import SERVICES_DIR, upgrade
from shared.shardmove import CLEAN_MARGIN_SECONDS, MoveSpec, move_municipality

CHIYODA, SAPPORO = "131016", "011002"  # shards s0 and s1
HEADER = "個別宛名番号,氏名,氏名カナ,生年月日,性別,個人番号,住所,券番号\r\n"


def my_number(n: int) -> str:
    first = f"{n:011d}"
    return first + str(my_number_check_digit(first))


def generate(path: Path, residents: int, *, offset: int = 0, id_prefix: str = "", coupon_base: int = 0) -> None:
    """Resident ``offset + i`` has My Number ``my_number(10**9 + offset + i)`` in every file, so two files
    with the same offset describe the same people (a move); ids and coupon numbers are the municipality's."""
    with path.open("w", encoding="cp932", newline="") as f:
        f.write(HEADER)
        for i in range(residents):
            n = offset + i
            f.write(
                f"{id_prefix}{n:09d},山田 太郎{i % 100},ヤマダ タロウ,{1930 + i % 80}{1 + i % 12:02d}{1 + i % 28:02d},"
                f"{1 + i % 2},{my_number(10**9 + n)},東京都千代田区千代田1-{i % 100},{coupon_base + n + 1:010d}\r\n"
            )


def headers(code: str) -> dict[str, str]:
    return {"Authorization": dev_gateway_issuer().authorization(Principal.named(Role.MUNICIPALITY, municipality=code))}


async def migrated(pg: PostgresServer, service: str, shard_map: Any) -> tuple[str, dict[str, str]]:
    names = {"main": f"{service}_main", "s0": f"{service}_s0", "s1": f"{service}_s1"}
    for name in names.values():
        pg.create_database(name)
    trees = SERVICES_DIR / service / "migrations"
    await asyncio.to_thread(upgrade, pg.dsn(names["main"]), trees / "main")
    for shard in ("s0", "s1"):
        await asyncio.to_thread(upgrade, pg.dsn(names[shard]), trees / "shard")
    dbs = Databases.connect(pg.dsn(names["main"]), {}, pool_size=1)
    async with dbs.main.sessionmaker() as session, session.begin():
        await session.execute(
            shard_map.insert(),
            [
                {"municipality_code": c, "shard": s, "assigned_at": utcnow()}
                for c, s in ((CHIYODA, "s0"), (SAPPORO, "s1"))
            ],
        )
    await dbs.dispose()
    return pg.dsn(names["main"]), {s: pg.dsn(names[s]) for s in ("s0", "s1")}


def _p50_p99(seconds: list[float], digits: int = 0) -> str:
    return f"p50 {percentile(seconds, 0.5) * 1000:.{digits}f} ms, p99 {percentile(seconds, 0.99) * 1000:.{digits}f} ms"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _with_children(pid: int | None) -> list[int]:
    return [] if pid is None else [pid, *children_of(pid)]


async def bench_import(
    client: httpx.AsyncClient, app: Any, path: Path, code: str, pg: PostgresServer
) -> tuple[float, int]:
    # The registry's own process (and its import workers) and PostgreSQL, each in CPU per resident: on a shared
    # machine the rate depends on the neighbours, the CPU much less.
    meter = CpuMeter({"registry": lambda: _with_children(os.getpid()), "postgres": lambda: _with_children(pg.pid)})
    meter.start()
    t0, c0 = time.monotonic(), cpu()
    url = f"/api/v1/municipalities/{code}/resident-imports"
    data = await asyncio.to_thread(path.read_bytes)
    r = await client.post(url, content=data, headers=headers(code) | {"Content-Type": "text/csv"})
    import_id = r.json()["import_id"]
    await app.state.importer.wait(import_id)
    seconds, cpu_seconds = time.monotonic() - t0, cpu() - c0
    meter.stop()
    status = (await client.get(f"{url}/{import_id}", headers=headers(code))).json()
    per_row = {group: cores * seconds / max(1, status["rows_total"]) * 1e6 for group, cores in meter.cores.items()}
    say(
        f"import: {status['rows_ok']:,} ok, {status['rows_failed']:,} failed in {seconds:.1f}s "
        f"(registry process CPU {cpu_seconds:.1f}s; CPU per resident: registry with its workers "
        f"{per_row['registry']:.0f} µs, PostgreSQL {per_row['postgres']:.0f} µs; {meter.line()})"
    )
    return seconds, int(status["rows_ok"])


# The baseline: the same file's rows, as they are (cp932 converted by the server), into a plain table without
# keys or indexes — its columns all text, or typed as the CSV's values are (the birth date a date).
RAW_TABLES = {
    "text": "resident_id text, name text, name_kana text, birth_date text, sex text, my_number text, address text,"
    " coupon_number text",
    "typed": "resident_id varchar(64), name text, name_kana text, birth_date date, sex varchar(1),"
    " my_number varchar(12), address text, coupon_number varchar(10)",
}


async def bench_copy(dsn: str, path: Path) -> dict[str, float]:
    """Seconds of a raw ``COPY`` of the file into each of :data:`RAW_TABLES`."""
    conn = await asyncpg.connect(dsn.replace("postgresql+asyncpg", "postgresql"))
    seconds = {}
    try:
        for shape, columns in RAW_TABLES.items():
            await conn.execute(f"CREATE TABLE raw_residents_{shape} ({columns})")
            t0 = time.monotonic()
            with path.open("rb") as f:
                await conn.copy_to_table(f"raw_residents_{shape}", source=f, format="csv", header=True, encoding="SJIS")
            seconds[shape] = time.monotonic() - t0
            await conn.execute(f"DROP TABLE raw_residents_{shape}")
        return seconds
    finally:
        await conn.close()


async def bench_lookups(client: httpx.AsyncClient, people: int, rounds: int) -> None:
    url = f"/api/v1/municipalities/{CHIYODA}/transfer-lookups"
    rng = random.Random(7)
    single = []
    for _ in range(rounds):
        number = my_number(10**9 + 5_000_000 + rng.randrange(people))
        t = time.monotonic()
        r = await client.post(url, json={"my_number": number, "legal_basis": "consent"}, headers=headers(CHIYODA))
        single.append(time.monotonic() - t)
        assert r.status_code == 200, r.text
    say(f"transfer lookup, single: {_p50_p99(single)}")
    batch = []
    for _ in range(max(3, rounds // 20)):
        items = [
            {
                "client_id": str(i),
                "my_number": my_number(10**9 + 5_000_000 + rng.randrange(people)),
                "legal_basis": "consent",
            }
            for i in range(1000)
        ]
        t = time.monotonic()
        r = await client.post(
            f"{url}/batch", json={"lookups": items}, headers=headers(CHIYODA) | {"X-Access-Purpose": "consent"}
        )
        batch.append(time.monotonic() - t)
        assert r.status_code == 200, r.text
    say(f"transfer lookup, batch of 1,000: {_p50_p99(batch)}")


async def bench_projection(records_dbs: Databases, sizes: list[int]) -> None:
    """Look-ups at the small size (Chiyoda's coupons, shard s0) and the large one (Sapporo's, shard s1),
    interleaved in random order: on a shared machine the load changes by the second, and measuring one size
    after the other compared two different moments rather than two table sizes."""
    small, large = sizes
    columns = [
        "municipality_code",
        "coupon_number",
        "resident_id",
        "sex",
        "birth_date",
        "invalid_from",
        "invalid_reason",
        "version",
        "updated_at",
    ]
    where = {CHIYODA: ("s0", small), SAPPORO: ("s1", large)}
    now = utcnow()
    for code, (shard, size) in where.items():
        conn = await asyncpg.connect(records_dbs.shards[shard].url.replace("postgresql+asyncpg", "postgresql"))
        try:
            await conn.copy_records_to_table(
                "coupons",
                records=((code, f"{n + 1:010d}", f"r{n}", "F", None, None, None, 1, now) for n in range(size)),
                columns=columns,
            )
            await conn.execute("ANALYZE coupons")
            plan = await conn.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF, FORMAT JSON) "
                "SELECT * FROM coupons WHERE municipality_code = $1 AND coupon_number = $2",
                code,
                f"{size // 2:010d}",
            )
            node = json.loads(plan)[0]["Plan"]
            say(
                f"projection at {size:,} coupons: {node['Node Type']} on {node.get('Index Name')}, "
                f"{node.get('Shared Hit Blocks', 0)} buffers hit, {node.get('Shared Read Blocks', 0)} read"
            )
        finally:
            await conn.close()
    rng = random.Random(7)
    times: dict[str, list[float]] = {CHIYODA: [], SAPPORO: []}
    sessions = {code: records_dbs.shards[shard].sessionmaker() for code, (shard, _) in where.items()}
    try:
        for _ in range(2000):
            for code in rng.sample(list(where), 2):
                number = f"{rng.randrange(where[code][1]) + 1:010d}"
                t = time.monotonic()
                assert await ProjectionRepository(sessions[code]).get(code, number) is not None
                times[code].append(time.monotonic() - t)
                sessions[code].expunge_all()
    finally:
        for session in sessions.values():
            await session.close()
    for code, (_, size) in where.items():
        say(f"projection look-up at {size:,} coupons: {_p50_p99(times[code], digits=2)}")
    ratio = percentile(times[SAPPORO], 0.99) / percentile(times[CHIYODA], 0.99)
    print(f"projection look-up p99 at {large:,} / at {small:,}: {ratio:.2f}x", flush=True)


class _CountingClient(InternalClient):
    calls = 0

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        self.calls += 1
        return await super().request(method, path, **kwargs)


async def bench_sweep(app: Any, records_shard: str, registry_main: str, count: int) -> None:
    """``count`` cards of two doses each, the doses in records' shard s0; every 100th card's second dose voided."""
    now = utcnow()
    dose_columns = [
        "dose_id", "municipality_code", "coupon_number", "coupon_line", "dose_number", "vaccinated_on", "vaccine",
        "lot_number", "venue", "doctor", "medical_worker", "status", "findings", "rules_version", "resident_id",
        "sex", "age_band", "voided", "recorded_by", "recorded_at", "updated_at", "version",
    ]  # fmt: skip
    day = now.date()

    def doses() -> Any:
        for n in range(count):
            for k in (1, 2):
                voided = k == 2 and n % 100 == 0
                yield (
                    f"d{n}-{k}", CHIYODA, f"{n:010d}", "x", k, day, "pfizer", "EY0583", None, None, False,
                    "recorded", "[]", "bench", f"r{n}", "F", "65-", voided, "bench", now, now, 2 if voided else 1,
                )  # fmt: skip

    def cards() -> Any:
        for n in range(count):
            shown = [{"dose_id": f"d{n}-{k}", "version": 1} for k in (1, 2)]
            yield (f"c{n:08d}", CHIYODA, f"r{n}", "bench", f"rid{n}", json.dumps(shown), "0" * 64, now, None, None)

    conn = await asyncpg.connect(records_shard.replace("postgresql+asyncpg", "postgresql"))
    await conn.copy_records_to_table("doses", records=doses(), columns=dose_columns)
    await conn.execute("ANALYZE doses")
    await conn.close()
    conn = await asyncpg.connect(registry_main.replace("postgresql+asyncpg", "postgresql"))
    await conn.copy_records_to_table(
        "issued_certificates",
        records=cards(),
        columns=[
            "certificate_id", "municipality_code", "resident_id", "kid", "rid", "doses", "subject_digest",
            "issued_at", "revoked_at", "revoked_reason",
        ],
    )  # fmt: skip
    await conn.execute("ANALYZE issued_certificates")
    await conn.close()
    records = _CountingClient(app.state.settings.records_url)
    try:
        for label in ("a pass with 1% of cards stale", "a pass with nothing changed"):
            records.calls, started, cpu_before = 0, time.monotonic(), cpu()
            done = await certificates.sweep(app.state.databases, records, app.state.issuer, batch_size=500)
            seconds, cpu_seconds = time.monotonic() - started, cpu() - cpu_before
            print(
                f"certificate sweep, {label}: {done.checked:,} cards in {seconds:.1f}s "
                f"({done.checked / seconds:,.0f} cards/s; {records.calls} records calls; {done.revoked:,} revoked; "
                f"registry+records CPU {cpu_seconds:.1f}s)",
                flush=True,
            )
    finally:
        await records.close()


async def bench_move(registry: tuple[str, dict[str, str]], records: tuple[str, dict[str, str]]) -> None:
    """Move Chiyoda (everything imported above) from s0 to s1, as ``vrs shards move`` does."""
    specs = [
        MoveSpec(
            "registry", Databases.connect(*registry, pool_size=2), REGISTRY_TABLES, registry_moves, registry_shards
        ),
        MoveSpec("records", Databases.connect(*records, pool_size=2), RECORDS_TABLES, records_moves, records_shards),
    ]
    try:
        t0 = time.monotonic()
        moves = await move_municipality(specs, CHIYODA, "s1", progress=say)
        total = time.monotonic() - t0
    finally:
        for spec in specs:
            await spec.databases.dispose()
    for service, move in moves.items():
        rows = sum(move["rows"].values())
        print(
            f"shard move {service}: {rows:,} rows, write pause {move['pause_seconds']:.2f}s "
            f"(whole move {total:.1f}s, including the {SHARD_MAP_TTL_SECONDS + CLEAN_MARGIN_SECONDS:.0f}s wait "
            "before deleting the source)",
            flush=True,
        )


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="vrs-bench-registry-") as tmp_name, contextlib.ExitStack() as cleanup:
        tmp = Path(tmp_name)
        pg_settings = {} if args.pg_defaults else production_pg_settings()
        pg = PostgresServer(tmp / "postgres", free_port(), log_path=tmp / "postgres.log", settings=pg_settings)
        pg.start()
        say(pg_parameters_line(args.pg_defaults))
        cleanup.callback(pg.stop)
        csv_path = tmp / "juki.csv"
        if args.only != "sweep":
            say(f"generating {args.residents:,} residents (cp932)")
            await asyncio.to_thread(generate, csv_path, args.residents)
        registry_main, registry_shard_dsns = await migrated(pg, "registry", registry_shards)
        records_main, records_shard_dsns = await migrated(pg, "records", records_shards)

        port = free_port()
        records_settings = RecordsSettings(
            main_dsn=records_main, shard_dsns=records_shard_dsns, run_relay=False, run_consumer=False, pool_size=5
        )
        server = uvicorn.Server(uvicorn.Config(create_records(records_settings), port=port, log_level="warning"))
        server_task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
            await asyncio.sleep(0.05)
        settings = RegistrySettings(
            main_dsn=registry_main,
            shard_dsns=registry_shard_dsns,
            run_relay=False,
            records_url=f"http://127.0.0.1:{port}",
            certificate_sweep_seconds=0,  # part 4 drives its passes
        )
        app = create_registry(settings)
        try:
            async with (
                app.router.lifespan_context(app),
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app), base_url="http://registry", timeout=600
                ) as client,
            ):
                if args.certificates and args.only != "import":
                    await bench_sweep(app, records_shard_dsns["s0"], registry_main, args.certificates)
                if args.only == "sweep":
                    return 0
                seconds, ok = await bench_import(client, app, csv_path, CHIYODA, pg)
                copy_seconds = await bench_copy(registry_shard_dsns["s0"], csv_path)
                rate = ok / seconds
                copy_rates = {shape: args.residents / s for shape, s in copy_seconds.items()}
                say(
                    "raw COPY of the same file: "
                    + ", ".join(f"{s:.2f}s ({shape})" for shape, s in copy_seconds.items())
                )
                print(
                    f"registry import: {rate:,.0f} residents/s; raw COPY "
                    + "; ".join(
                        f"into {shape} columns {r:,.0f} rows/s, import {rate / r:.1%} of it"
                        for shape, r in copy_rates.items()
                    ),
                    flush=True,
                )
                if args.only == "import":
                    return 0
                # Movers: people of Sapporo (shard s1) now registered in Chiyoda, for the look-ups.
                movers = min(args.movers, args.residents)
                movers_csv, arrived_csv = tmp / "movers.csv", tmp / "movers-chiyoda.csv"
                await asyncio.to_thread(generate, movers_csv, movers, offset=5_000_000)
                await asyncio.to_thread(
                    generate, arrived_csv, movers, offset=5_000_000, id_prefix="C", coupon_base=8_000_000_000
                )
                await bench_import(client, app, movers_csv, SAPPORO, pg)
                await bench_import(client, app, arrived_csv, CHIYODA, pg)
                # What the imports left dirty in the page cache, written now rather than in the middle of the
                # look-ups (see devtools.bench.core.write_back).
                say(f"wrote back {describe_write_back(*await write_back())}")
                await bench_lookups(client, movers, args.lookups)
            records_dbs = Databases.connect(records_main, records_shard_dsns, pool_size=2)
            try:
                await bench_projection(records_dbs, [10_000, args.projection])
            finally:
                await records_dbs.dispose()
            if args.move:  # last: the projection's rows above are Chiyoda's too, and move with it
                await bench_move((registry_main, registry_shard_dsns), (records_main, records_shard_dsns))
        finally:
            server.should_exit = True
            await server_task
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench registry")
    parser.add_argument("--residents", type=int, default=1_000_000)
    parser.add_argument("--movers", type=int, default=20_000)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--projection", type=int, default=1_000_000)
    parser.add_argument("--certificates", type=int, default=100_000, help="cards for the sweep (0: no sweep part)")
    parser.add_argument("--only", choices=["sweep", "import"], help="run one part alone")
    parser.add_argument("--no-move", dest="move", action="store_false", help="skip the shard move")
    pg_defaults_option(parser)
    args = parser.parse_args(argv or [])
    return asyncio.run(run(args))
