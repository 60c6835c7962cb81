"""``make soak``: steady mixed load on PostgreSQL + Kafka while faults are injected, then drain and reconcile.

The system runs as production runs it — every API, and every outbox relay and consumer as a process of its
own — so each can be killed alone. Load (single doses, retried with the same key until answered; batches;
corrections and voids; double scans; bad input; resident changes in registry) runs for ``--minutes`` while
faults come one after another: ``kill -9`` of a relay, a consumer, records, registry; the Kafka broker down
for 30 s; a PostgreSQL restart; a power loss (every process, PostgreSQL and Kafka killed at once). Then the
load stops, the backlogs drain, and the books are compared:

- every dose the client was told is stored is live in records (lost = those that are not), and records holds
  no dose the client was never told about (double-counted);
- stats' cells equal records' doses cell by cell, and stats applied exactly the events records wrote;
- every coupon change in registry reached records' projection (same version per coupon).

It prints a table and exits 1 if anything was lost or double-counted. A program that prints numbers, not a
test: ``python -m devtools.soak [--minutes 10] [--keep]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from devtools.harness import free_port, scratch_directory
from devtools.harness.kafka import KafkaServer
from devtools.harness.postgres import PostgresServer, WalStream, production_pg_settings, restore_cluster
from devtools.launcher import Stack
from devtools.stack import (
    SERVICES,
    SHARDS,
    TOPICS,
    WORKERS,
    WORKERS_ENV,
    postgres_databases,
    postgres_env,
    wiring_env,
)
from devtools.tokens import bearer_headers
from shared.auth import Role
from shared.outbox import EVENTS_OF_ROW_SQL

MUNICIPALITIES = ("131016", "011002", "271004")  # 千代田区, 札幌市, 大阪市
INSTITUTION = "1312345678"
RESIDENTS = 240
FIRST_DAY = date(2021, 6, 1)
_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", flush=True)


# --- the system ----------------------------------------------------------------------------------------


@dataclass
class System:
    tmp: Path
    pg: PostgresServer
    kafka: KafkaServer
    stack: Stack
    # Databases in a cluster of their own (the rest are on ``pg``), with their WAL streamed to a backup.
    placement: dict[str, PostgresServer] = field(default_factory=dict)
    streams: dict[str, WalStream] = field(default_factory=dict)

    def server(self, database: str) -> PostgresServer:
        return self.placement.get(database, self.pg)

    def start_all(self) -> None:
        for spec in SERVICES:
            self.stack.start_service(spec.name)
        for spec in SERVICES:
            self.stack.wait_healthy(spec.name, timeout=90)
        for name, args in WORKERS.items():
            self.stack.start_worker(name, *args)

    def restart(self, name: str) -> None:
        self.stack.processes.pop(name, None)
        if name in WORKERS:
            self.stack.start_worker(name, *WORKERS[name])
        else:
            self.stack.start_service(name)
            self.stack.wait_healthy(name, timeout=90)

    def kill9(self, name: str) -> None:
        process = self.stack.processes.get(name)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def revive_dead(self) -> list[str]:
        dead = self.stack.exited()
        for name in dead:
            self.restart(name)
        return dead

    def lose_cluster(self, database: str) -> None:
        """The disk of ``database``'s own cluster is gone: the server dies and its data directory with it."""
        server = self.placement[database]
        server.kill()
        self.streams[database].wait_exit()
        shutil.rmtree(server.data_dir)

    def restore_clusters(self, base_backups: dict[str, Path]) -> None:
        """Each database's cluster again, fresh (new directory, new port) from its base backup and its WAL
        stream; then the services and workers that use them are pointed at them and restarted."""
        for database, base_backup in base_backups.items():
            lost, fresh = self.placement[database], self.tmp / f"postgres-{database}-restored"
            self.placement[database] = restore_cluster(
                base_backup,
                self.streams[database].directory,
                fresh,
                free_port(),
                log_path=self.tmp / "log" / fresh.name,
            )
            say(f"{database}: restored from {base_backup.name} on port {self.server(database).port} (was {lost.port})")
        self.stack.env.update(
            postgres_env(lambda name: self.server(name).dsn(name), kafka_bootstrap=self.kafka.bootstrap_servers)
        )
        owners = {database.partition("_")[0] for database in base_backups}
        users = [name for name in self.stack.processes if name in owners or WORKERS.get(name, ("", ""))[1] in owners]
        for name in users:
            self.kill9(name)
        for name in users:
            self.restart(name)

    def sql(self, database: str, query: str) -> list[list[str]]:
        out = self.server(database).execute(query, database=database)
        return [line.split("|") for line in out.splitlines() if line]


# Every lock wait of deadlock_timeout (1 s) or more is logged, and the longest are reported: a request that
# times out outside any fault window has most often waited on a lock (found so: a correction waiting 12 s on
# records' coupon consumer, 2026-11-26).
LOCK_WAITS = {"log_lock_waits": "on"}
_LOCK_ACQUIRED = re.compile(
    r"\[(\d+)\] LOG:  process \d+ acquired (\w+) on (.*) after ([0-9.]+) ms\n(?:.*CONTEXT:  (.*)\n)?"
)


def lock_waits(log_dir: Path) -> list[tuple[float, str]]:
    """(seconds, what) of each lock wait the PostgreSQL logs under ``log_dir`` show, longest first."""
    waits = []
    for path in sorted(log_dir.glob("postgres*.log")):
        for match in _LOCK_ACQUIRED.finditer(path.read_text(errors="replace")):
            pid, mode, what, ms, context = match.groups()
            waits.append((float(ms) / 1000, f"{mode} on {what}{', ' + context if context else ''}; backend {pid}"))
    return sorted(waits, reverse=True)


def start_system(tmp: Path, cleanup: contextlib.ExitStack, *, streamed: tuple[str, ...] = ()) -> System:
    """The whole system under ``tmp``; each database named in ``streamed`` gets a PostgreSQL cluster of its
    own whose WAL is streamed synchronously to ``tmp/<database>-wal`` (the backup's object store)."""
    logs = tmp / "log"
    logs.mkdir(parents=True, exist_ok=True)
    # PostgreSQL with production's memory and WAL parameters (deploy/k8s), as the benches run it.
    settings = production_pg_settings() | LOCK_WAITS
    pg = PostgresServer(tmp / "postgres", free_port(), log_path=logs / "postgres.log", settings=settings)
    kafka = KafkaServer(tmp / "kafka", free_port(), free_port(), log_path=logs / "kafka.log")
    placement = {
        name: PostgresServer(
            tmp / f"postgres-{name}",
            free_port(),
            log_path=logs / f"postgres-{name}.log",
            settings=settings | WalStream.server_settings(),
        )
        for name in streamed
    }
    streams = {name: WalStream(server, tmp / f"{name}-wal") for name, server in placement.items()}
    cleanup.callback(pg.stop)
    cleanup.callback(kafka.stop)
    say("starting PostgreSQL and Kafka ...")
    with ThreadPoolExecutor(1) as background:
        kafka_started = background.submit(kafka.start)  # a JVM's start: overlap it with PostgreSQL's
        pg.start()
        for name, server in placement.items():
            cleanup.callback(streams[name].stop)
            cleanup.callback(server.stop)
            server.start()
            streams[name].start()
        kafka_started.result()
    for name in postgres_databases():
        placement.get(name, pg).create_database(name)
    for topic, partitions in TOPICS.items():
        kafka.create_topic(topic, partitions)
    ports = {spec.name: free_port() for spec in SERVICES}
    env = {
        **os.environ,
        "VRS_VAR_DIR": str(tmp / "var"),
        "VRS_ENVIRONMENT": "test",
        **postgres_env(lambda name: placement.get(name, pg).dsn(name), kafka_bootstrap=kafka.bootstrap_servers),
        **wiring_env(ports),
        **WORKERS_ENV,  # production's shape: relays and consumers are processes of their own
    }
    say("migrating ...")
    subprocess.run([sys.executable, "-m", "shared.cli", "migrate"], env=env, check=True)
    stack = Stack(env=env, ports=ports, log_dir=logs)
    cleanup.callback(stack.stop)
    system = System(tmp=tmp, pg=pg, kafka=kafka, stack=stack, placement=placement, streams=streams)
    say("starting the services and their relays and consumers ...")
    system.start_all()
    return system


# --- the client's books --------------------------------------------------------------------------------


@dataclass
class Ledger:
    accepted: dict[str, str] = field(default_factory=dict)  # dose_id -> municipality, as the client was told
    voided: set[str] = field(default_factory=set)
    sent: Counter[str] = field(default_factory=Counter)  # by kind
    rejected: Counter[str] = field(default_factory=Counter)  # by reason
    duplicates: int = 0
    retries: int = 0
    same_key_replays: int = 0
    replay_mismatches: int = 0
    # (when, what and on which route) of 5xx answers and broken connections
    failures: list[tuple[float, str]] = field(default_factory=list)
    corrections: int = 0
    resident_changes: int = 0

    def live(self) -> set[str]:
        return set(self.accepted) - self.voided


@dataclass
class Fault:
    name: str
    started: float = 0.0
    ended: float = 0.0


class Client:
    def __init__(self, session: aiohttp.ClientSession, gateway: str, ledger: Ledger, stop: asyncio.Event) -> None:
        self.session, self.gateway, self.ledger, self.stop = session, gateway, ledger, stop
        self.clinic = {**bearer_headers(Role.INSTITUTION, institution=INSTITUTION), "Content-Type": "application/json"}
        self.offices = {m: bearer_headers(Role.MUNICIPALITY, municipality=m) for m in MUNICIPALITIES}

    async def send(self, method: str, path: str, *, headers: dict[str, str], json: Any) -> tuple[int, Any]:
        """Until the system answers something other than a 5xx/429 or a broken connection; same request again."""
        delay = 0.2
        while True:
            try:
                async with self.session.request(method, self.gateway + path, headers=headers, json=json) as r:
                    body = await r.json(content_type=None)
                    if r.status < 500 and r.status != 429:
                        return r.status, body
                    # What the system said (a problem document's detail), so a report names the cause.
                    detail = body.get("detail") if isinstance(body, dict) else None
                    what = f"{r.status} {detail}" if detail else f"{r.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                what = type(exc).__name__
            self.ledger.failures.append((time.monotonic(), f"{what} ({method} {path})"))
            self.ledger.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)


@dataclass
class Coupon:
    municipality: str
    number: str
    resident_id: str
    sex: str = "F"
    birth: str = "1950-04-02"
    registered: bool = False
    doses: int = 0

    def line(self, dose_number: int) -> str:
        return f"1{dose_number}{self.municipality}{self.number}"


def dose_doc(coupon: Coupon, dose_number: int) -> dict[str, Any]:
    day = FIRST_DAY + timedelta(days=28 * (dose_number - 1) + random.randrange(7))
    return {
        "coupon": coupon.line(dose_number),
        "dose_number": dose_number,
        "vaccinated_on": day.isoformat(),
        "vaccine": "pfizer",
        "lot_number": f"EY{random.randrange(1000, 9999)}",
        "venue": "集団接種会場",
    }


def note_answer(ledger: Ledger, coupon: Coupon, status: int, body: Any, kind: str) -> str | None:
    if status in (200, 201) and body.get("status") == "duplicate":
        ledger.duplicates += 1
        return str(body["dose_id"])
    if status in (200, 201):
        ledger.accepted[str(body["dose_id"])] = coupon.municipality
        return str(body["dose_id"])
    reason = (body.get("errors") or [{}])[0].get("field") or body.get("error", str(status))
    ledger.rejected[f"{kind}: {status} {reason}"] += 1
    return None


async def single_doses(client: Client, coupons: list[Coupon]) -> None:
    while not client.stop.is_set():
        coupon = random.choice(coupons)
        dose_number = min(coupon.doses + 1, 3)
        doc, key = dose_doc(coupon, dose_number), str(uuid.uuid4())
        headers = {**client.clinic, "Idempotency-Key": key}
        client.ledger.sent["single"] += 1
        status, body = await client.send("POST", "/api/v1/doses", headers=headers, json=doc)
        first = note_answer(client.ledger, coupon, status, body, "single")
        coupon.doses = max(coupon.doses, dose_number)
        if first is not None and random.random() < 0.1:  # the tablet retries a request it already got through
            status, body = await client.send("POST", "/api/v1/doses", headers=headers, json=doc)
            client.ledger.same_key_replays += 1
            if body.get("dose_id") != first:
                client.ledger.replay_mismatches += 1
        if first is not None and random.random() < 0.05:  # a double scan under a new key
            status, body = await client.send(
                "POST", "/api/v1/doses", headers={**client.clinic, "Idempotency-Key": str(uuid.uuid4())}, json=doc
            )
            note_answer(client.ledger, coupon, status, body, "double scan")


async def batches(client: Client, coupons: list[Coupon]) -> None:
    while not client.stop.is_set():
        items, picked = [], []
        for coupon in random.sample(coupons, 40):
            dose_number = min(coupon.doses + 1, 3)
            coupon.doses = max(coupon.doses, dose_number)
            items.append({"client_id": str(uuid.uuid4()), **dose_doc(coupon, dose_number)})
            picked.append(coupon)
        client.ledger.sent["batch item"] += len(items)
        status, body = await client.send("POST", "/api/v1/doses/batch", headers=client.clinic, json={"doses": items})
        if status != 200:
            client.ledger.rejected[f"batch: {status}"] += len(items)
            continue
        for coupon, result in zip(picked, body["results"], strict=True):
            if result["status"] == "rejected":
                client.ledger.rejected[f"batch item: {result['error']['error']}"] += 1
            else:
                note_answer(client.ledger, coupon, 201, result, "batch item")
        await asyncio.sleep(0.5)


async def bad_input(client: Client) -> None:
    while not client.stop.is_set():
        doc = {**dose_doc(Coupon("131016", "0000000001", "x"), 1), "coupon": "111310170000000001"}  # check digit
        client.ledger.sent["bad input"] += 1
        status, body = await client.send(
            "POST", "/api/v1/doses", headers={**client.clinic, "Idempotency-Key": str(uuid.uuid4())}, json=doc
        )
        note_answer(client.ledger, Coupon("131016", "0", "x"), status, body, "bad input")
        await asyncio.sleep(2)


async def corrections(client: Client) -> None:
    while not client.stop.is_set():
        await asyncio.sleep(0.5)
        live = list(client.ledger.live())
        if not live:
            continue
        dose_id = random.choice(live)
        municipality = client.ledger.accepted[dose_id]
        void = random.random() < 0.2
        change: dict[str, Any] = (
            {"void": True, "reason": "soak: recorded twice"}
            if void
            else {"changes": {"medical_worker": True}, "reason": "soak: the person is a nurse"}
        )
        client.ledger.sent["void" if void else "correction"] += 1
        path = f"/api/v1/municipalities/{municipality}/doses/{dose_id}/corrections"
        status, body = await client.send("POST", path, headers=client.offices[municipality], json=change)
        if status == 200:
            client.ledger.corrections += 1
            if void:
                client.ledger.voided.add(dose_id)
        elif status == 409 and void:  # an earlier attempt of this void got through before the answer was lost
            client.ledger.voided.add(dose_id)
        elif status != 409:
            client.ledger.rejected[f"correction: {status} {body.get('error')}"] += 1


async def put_resident(client: Client, coupon: Coupon) -> None:
    body = {
        "name": "検証 太郎",
        "name_kana": "ケンショウ タロウ",
        "birth_date": coupon.birth,
        "sex": coupon.sex,
        "coupon_number": coupon.number,
    }
    path = f"/api/v1/municipalities/{coupon.municipality}/residents/{coupon.resident_id}"
    status, answer = await client.send("PUT", path, headers=client.offices[coupon.municipality], json=body)
    if status not in (200, 201):
        client.ledger.rejected[f"resident: {status} {answer.get('error')}"] += 1
    else:
        coupon.registered = True
        client.ledger.resident_changes += 1


async def resident_changes(client: Client, coupons: list[Coupon]) -> None:
    """Registers the residents not registered yet (their doses get matched) and changes others' attributes."""
    while not client.stop.is_set():
        await asyncio.sleep(0.7)
        coupon = random.choice(coupons)
        if coupon.registered:
            coupon.sex = random.choice("MFU")
            coupon.birth = random.choice(["1950-04-02", "1980-01-01", "1999-12-31"])
        await put_resident(client, coupon)


# --- faults --------------------------------------------------------------------------------------------


def fault_plan() -> list[tuple[str, Callable[[System], None]]]:
    def kill_and_restart(name: str) -> Callable[[System], None]:
        def run(system: System) -> None:
            system.kill9(name)
            time.sleep(1)
            system.restart(name)

        return run

    def kafka_down(system: System) -> None:
        system.kafka.stop()
        time.sleep(30)
        system.kafka.start()

    def postgres_restart(system: System) -> None:
        system.pg.stop()
        system.pg.start()

    def power_loss(system: System) -> None:
        for name in list(system.stack.processes):
            system.kill9(name)
        system.pg.kill()
        system.kafka.kill()
        time.sleep(1)
        system.pg.start()
        system.kafka.start()
        system.start_all()

    return [
        ("kill -9 records-relay", kill_and_restart("records-relay")),
        ("power loss", power_loss),
        ("kill -9 stats-consumer", kill_and_restart("stats-consumer")),
        ("kill -9 records", kill_and_restart("records")),
        ("Kafka down 30 s", kafka_down),
        ("kill -9 records-consumer", kill_and_restart("records-consumer")),
        ("PostgreSQL restart", postgres_restart),
        ("kill -9 registry", kill_and_restart("registry")),
        ("kill -9 registry-relay", kill_and_restart("registry-relay")),
    ]


def chosen_faults(only: str | None) -> list[tuple[str, Callable[[System], None]]]:
    plan = fault_plan()
    if not only:
        return plan
    wanted = [w.strip() for w in only.split(",")]
    chosen = [(name, run) for name, run in plan if any(w in name for w in wanted)]
    if not chosen:
        raise SystemExit(f"--faults {only!r} names none of: {', '.join(n for n, _ in plan)}")
    return chosen


async def inject_faults(
    system: System,
    stop: asyncio.Event,
    every: float,
    faults: list[Fault],
    plan: list[tuple[str, Callable[[System], None]]],
) -> None:
    for name, run in itertools.cycle(plan):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
        if stop.is_set():
            return
        fault = Fault(name, started=time.monotonic())
        say(f"fault: {name}")
        await asyncio.to_thread(run, system)
        fault.ended = time.monotonic()
        faults.append(fault)
        say(f"  back after {fault.ended - fault.started:.1f}s")


# --- drain and reconcile -------------------------------------------------------------------------------


def records_live(system: System) -> set[str]:
    ids: set[str] = set()
    for shard in SHARDS:
        ids |= {row[0] for row in system.sql(f"records_{shard}", "SELECT dose_id FROM doses WHERE NOT voided")}
    return ids


def backlog(system: System) -> int:
    total = 0
    for service in ("registry", "records"):
        for shard in SHARDS:
            [[n]] = system.sql(f"{service}_{shard}", "SELECT count(*) FROM outbox WHERE published_at IS NULL")
            total += int(n)
    return total


CELL = "vaccinated_on, municipality_code, sex, age_band, age_band_10, medical_worker, dose_number, vaccine"


def records_cells(system: System) -> Counter[tuple[str, ...]]:
    cells: Counter[tuple[str, ...]] = Counter()
    for shard in SHARDS:
        for *cell, n in system.sql(
            f"records_{shard}", f"SELECT {CELL}, count(*) FROM doses WHERE NOT voided GROUP BY {CELL}"
        ):
            cells[tuple(cell)] += int(n)
    return cells


def stats_cells(system: System) -> Counter[tuple[str, ...]]:
    rows = system.sql(
        "stats_main",
        "SELECT date, municipality, sex, age_band, age_band_10, medical_worker, dose_number, vaccine, count "
        "FROM dose_counts WHERE count <> 0",
    )
    return Counter({tuple(cell): int(n) for *cell, n in rows})


def coupon_versions(system: System, service: str) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    for shard in SHARDS:
        for municipality, number, version in system.sql(
            f"{service}_{shard}", "SELECT municipality_code, coupon_number, version FROM coupons"
        ):
            out[(municipality, number)] = version
    return out


def events_written(system: System) -> int:
    count = f"SELECT coalesce(sum({EVENTS_OF_ROW_SQL}), 0) FROM outbox"  # a batch's events may share a row
    return sum(int(system.sql(f"records_{s}", count)[0][0]) for s in SHARDS)


def events_applied(system: System) -> int:
    return int(system.sql("stats_main", "SELECT count(DISTINCT event_id) FROM processed_events")[0][0])


async def drain(system: System, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        await asyncio.to_thread(system.revive_dead)
        caught_up = await asyncio.to_thread(
            lambda: (
                backlog(system) == 0
                and records_cells(system) == stats_cells(system)
                and coupon_versions(system, "registry") == coupon_versions(system, "records")
                and events_written(system) == events_applied(system)
            )
        )
        if caught_up:
            break
        await asyncio.sleep(1)
    return time.monotonic() - started


# --- the run -------------------------------------------------------------------------------------------


async def soak(system: System, args: argparse.Namespace) -> int:
    ledger, faults, stop = Ledger(), list[Fault](), asyncio.Event()
    rng = random.Random(args.seed)
    random.seed(args.seed)
    coupons = [
        Coupon(m, f"{rng.randrange(10**9):09d}{i % 10}", f"soak-{i:05d}")
        for i, m in zip(range(RESIDENTS), itertools.cycle(MUNICIPALITIES), strict=False)
    ]
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as session:
        client = Client(session, system.stack.url(), ledger, stop)
        say(f"registering {RESIDENTS * 2 // 3} of {RESIDENTS} residents ...")
        for coupon in coupons[: RESIDENTS * 2 // 3]:
            await put_resident(client, coupon)
        load: list[Awaitable[None]] = [single_doses(client, coupons) for _ in range(args.clients)]
        load += [batches(client, coupons), bad_input(client), corrections(client), resident_changes(client, coupons)]
        tasks = [asyncio.ensure_future(t) for t in load]
        # Faults take time of their own (Kafka's outage 30 s and more): spaced so that all of them fit.
        plan = chosen_faults(args.faults)
        every = max(5.0, (args.minutes * 60 - 120) / (len(plan) + 1))
        injector = asyncio.ensure_future(inject_faults(system, stop, every, faults, plan))
        say(f"load for {args.minutes} min, a fault {every:.0f}s after the last one recovered ...")
        await asyncio.sleep(args.minutes * 60)
        stop.set()
        say("stopping the load (requests in flight are retried until answered) ...")
        await injector
        await asyncio.gather(*tasks)
    say("draining ...")
    drain_seconds = await drain(system)
    return report(system, ledger, faults, drain_seconds)


def _waits_summary(waits: list[tuple[float, str]]) -> str:
    if not waits:
        return "none"
    longest, what = waits[0]
    return f"{len(waits)}, the longest {longest:.1f} s ({what})"


def report(system: System, ledger: Ledger, faults: list[Fault], drain_seconds: float) -> int:
    live = records_live(system)
    told = ledger.live()
    lost = len(told - live)
    extra = len(live - told)
    r_cells, s_cells = records_cells(system), stats_cells(system)
    over = sum(max(0, s_cells[c] - r_cells[c]) for c in s_cells.keys() | r_cells.keys())
    under = sum(max(0, r_cells[c] - s_cells[c]) for c in s_cells.keys() | r_cells.keys())
    written, applied = events_written(system), events_applied(system)
    projection_ok = coupon_versions(system, "registry") == coupon_versions(system, "records")
    waits = lock_waits(system.tmp / "log")
    late = [
        (when, what) for when, what in ledger.failures if not any(f.started - 1 <= when <= f.ended + 10 for f in faults)
    ]
    rows = [
        ("faults injected", ", ".join(f"{n}×{c}" if c > 1 else n for n, c in Counter(f.name for f in faults).items())),
        ("requests sent", ", ".join(f"{k} {v:,}" for k, v in sorted(ledger.sent.items()))),
        (
            "doses accepted (client's books, live)",
            f"{len(told):,} ({len(ledger.accepted):,} accepted, {len(ledger.voided):,} voided)",
        ),
        ("double scans answered 'duplicate'", f"{ledger.duplicates:,}"),
        (
            "same-key retries answered with the same dose",
            f"{ledger.same_key_replays - ledger.replay_mismatches:,} of {ledger.same_key_replays:,}",
        ),
        ("rejected (by reason)", ", ".join(f"{k} ×{v}" for k, v in sorted(ledger.rejected.items())) or "none"),
        ("corrections and voids applied", f"{ledger.corrections:,}"),
        ("resident changes in registry", f"{ledger.resident_changes:,}"),
        ("5xx / broken connections during faults (retried)", f"{len(ledger.failures) - len(late):,}"),
        ("5xx / broken connections outside any fault window", f"{len(late):,}"),
        ("live doses in records", f"{len(live):,}"),
        ("stats total", f"{sum(s_cells.values()):,}"),
        ("dose events written / distinct ids applied by stats", f"{written:,} / {applied:,}"),
        ("coupon projection = registry (every coupon, same version)", "yes" if projection_ok else "NO"),
        ("LOST (told stored, not in records; or in records, not in stats)", f"{lost + under:,}"),
        ("DOUBLE-COUNTED (in records unasked; or in stats twice)", f"{extra + over:,}"),
        ("time to drain", f"{drain_seconds:.1f}s"),
        ("lock waits of 1 s or more (PostgreSQL's log)", _waits_summary(waits)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)
    for when, what in late[:20]:
        before = [f for f in faults if f.ended <= when]
        since = f"{when - before[-1].ended:.1f}s after {before[-1].name} recovered" if before else "before any fault"
        print(f"  outside a fault window: {what} at {when - _T0:.1f}s, {since}", flush=True)
    ok = lost + under + extra + over == 0 and written == applied and projection_ok and not late
    print(f"\nsoak {'PASSED' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m devtools.soak", description=__doc__.split("\n")[0] if __doc__ else ""
    )
    parser.add_argument("--minutes", type=float, default=float(env("VRS_SOAK_MINUTES", "10")))
    parser.add_argument("--clients", type=int, default=8, help="concurrent single-dose tablets")
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--faults", help="only these faults (comma-separated parts of their names)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    return parser.parse_args(argv)


def _terminate(signum: int, _: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    with scratch_directory("vrs-soak-", keep=args.keep, say=say) as tmp, contextlib.ExitStack() as cleanup:
        system = start_system(tmp, cleanup)
        return asyncio.run(soak(system, args))


if __name__ == "__main__":
    sys.exit(main())
