"""What every part of ``make bench`` shares: the system under test, the load generator, CPU meters, drains.

Starts a throwaway PostgreSQL and Kafka (the test harness, temporary directories, free ports), migrates,
starts the four services as ``make run-full`` does; the load generator runs in a process of its own
(the gateway's keep-alive HTTP client, pre-built bodies) and its CPU use is printed with everyone else's, so a generator
that became the bottleneck shows. Every non-2xx answer is counted and printed, never dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import resource
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import aiohttp

from devtools.harness.postgres import production_pg_parameters
from services.gateway.proxy import RawTransport, UpstreamTimeout, UpstreamUnreachable

if TYPE_CHECKING:
    from devtools.harness.kafka import KafkaServer
    from devtools.harness.postgres import PostgresServer
    from devtools.launcher import Stack

# Municipalities whose coupons the load uses: 千代田区, 札幌市, 大阪市, 福岡市, 那覇市 (check digits valid).
MUNICIPALITIES = ("131016", "011002", "271004", "401307", "472018")
# 横浜市: only lag probes use it, so each probe's (municipality, date) statistics cell is its own.
PROBE_MUNICIPALITY = "141003"
INSTITUTION = "1312345678"
LOAD_FIRST_DAY = date(2021, 3, 1)
LOAD_DAYS = 306  # up to 2021-12-31
PROBE_FIRST_DAY = date(2021, 3, 1)
# Coupon numbers are "<phase digit><9-digit serial>": unique across the run without any bookkeeping.
PHASE_SINGLE, PHASE_BATCH, PHASE_PROBE, PHASE_BASELINE, PHASE_CSV, PHASE_FIXED, PHASE_RESIDENT = 1, 2, 3, 4, 5, 6, 9
PHASE_MAX_AGAIN = 7
# Upper bound of what one generator can drive: bodies beyond it are built on the fly (and counted).
PREBUILD_RATE = 6000
DOSE_PATH = "/api/v1/doses"
STATS_PATH = "/api/v1/stats/doses"
# A bench is one caller at full speed (one clinic standing for a country's tablets): the gateway's rate limit per
# caller (2,000 requests/s by default) must not be what it measures.
UNLIMITED_CALLER = {"VRS_GATEWAY_RATE_PER_PRINCIPAL": "1000000", "VRS_GATEWAY_BURST_PER_PRINCIPAL": "1000000"}

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- what is sent -------------------------------------------------------------------------------------------


def coupon_number(phase: int, serial: int) -> str:
    return f"{phase}{serial:09d}"


def days_after_first(dose_number: int) -> int:
    """When the bench records a person's later dose, within the rules' intervals: 4 weeks after the first, then
    every 248 days (8 months of 31 days: never short of the longest booster rule, 8 months)."""
    return 0 if dose_number == 1 else 28 + 248 * (dose_number - 2)


def dose_doc(municipality: str, number: str, day: date, serial: int, dose_number: int = 1) -> dict[str, Any]:
    return {
        "coupon": f"1{dose_number}{municipality}{number}",  # kind 1 (a coupon of a course), the dose's own digit
        "dose_number": dose_number,
        "vaccinated_on": day.isoformat(),
        "vaccine": "moderna" if serial % 5 == 0 else "pfizer",
        # Each product's own lot format (vaccine_rules.toml): Spikevax 7 digits, Comirnaty 2 letters + 4 digits.
        "lot_number": f"300{serial % 10000:04d}" if serial % 5 == 0 else f"EY{serial % 10000:04d}",
        "venue": "集団接種会場",
    }


@dataclass(frozen=True)
class LoadSpec:
    """One closed-loop run of the load generator; pickled into its process."""

    name: str
    url: str
    headers: dict[str, str]
    kind: Literal["single", "batch"]
    concurrency: int
    warmup: float
    duration: float
    phase: int
    tag: str  # makes idempotency keys and client ids unique to this run
    # (municipality, coupon number) of registered residents: each is used once, released evenly over the
    # run (whatever its rate), so 'recorded' and 'unmatched' doses are mixed from start to end.
    matched: tuple[tuple[str, str], ...] = ()
    batch_size: int = 1000
    # Batches of later doses: the coupons of the batch phase's first ``coupon_batches`` batches, each already
    # holding its first dose; dose 2 of each, then (a second time round) dose 3, and so on (0: first doses).
    coupon_batches: int = 0
    # Open loop: requests are sent at this fixed rate (per second) whatever the answers' pace, and latency is
    # measured from when each was due, so a stall shows in the percentiles. 0: closed loop, ``concurrency``.
    rate: float = 0.0

    def single_body(self, i: int) -> bytes:
        """The ``i``-th dose for a coupon nobody holds (yet): accepted as 'unmatched'."""
        municipality = MUNICIPALITIES[i % len(MUNICIPALITIES)]
        day = LOAD_FIRST_DAY + timedelta(days=i % LOAD_DAYS)
        return json.dumps(dose_doc(municipality, coupon_number(self.phase, i), day, i), ensure_ascii=False).encode()

    def matched_body(self, j: int) -> bytes:
        """A dose for the ``j``-th registered resident's coupon: accepted as 'recorded'."""
        municipality, number = self.matched[j]
        day = LOAD_FIRST_DAY + timedelta(days=j % LOAD_DAYS)
        return json.dumps(dose_doc(municipality, number, day, j), ensure_ascii=False).encode()

    def batch_body(self, b: int) -> bytes:
        doses = []
        if self.coupon_batches:  # the b-th batch of later doses: an earlier batch's coupons, the next dose
            laps, first = divmod(b, self.coupon_batches)
            dose_number = 2 + laps
        else:
            first, dose_number = b, 1
        for k in range(self.batch_size):
            n = b * self.batch_size + k
            i = first * self.batch_size + k
            day = LOAD_FIRST_DAY + timedelta(days=i % LOAD_DAYS + days_after_first(dose_number))
            municipality = MUNICIPALITIES[i % len(MUNICIPALITIES)]
            doc = dose_doc(municipality, coupon_number(self.phase, i), day, i, dose_number)
            doses.append({"client_id": f"{self.tag}-{n}", **doc})
        return json.dumps({"doses": doses}, ensure_ascii=False).encode()


@dataclass
class LoadResult:
    name: str
    window: float
    requests: int = 0  # every request sent, warm-up included
    ok_in_window: int = 0  # answered with the expected status inside the measured window
    items_in_window: int = 0  # accepted doses inside the window (batch: items; single: = ok_in_window)
    latencies: list[float] = field(default_factory=list)  # seconds, ok answers inside the window
    # Every answer, warm-up included: (when it was due, from the window's start; latency), for by_second
    timeline: list[tuple[float, float]] = field(default_factory=list)
    errors: int = 0  # every request, warm-up included
    errors_in_window: int = 0
    items_rejected: int = 0  # batch items answered 'rejected' (every request)
    error_samples: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)  # the dose status answered, every request
    accepted_total: int = 0  # doses the service accepted (201 / batch items not rejected), every request
    bodies_built_late: int = 0
    cpu_seconds: float = 0.0  # the generator's own CPU inside the window

    @property
    def rate(self) -> float:
        return self.ok_in_window / self.window

    @property
    def item_rate(self) -> float:
        return self.items_in_window / self.window

    def by_second(self) -> str:
        """p99 (max) in ms of the answers (errors too) due in each second, warm-up included (negative
        seconds): a stall shows as a bad second or two, plain queueing as all of them high."""
        seconds: dict[int, list[float]] = {}
        for due, latency in self.timeline:
            seconds.setdefault(math.floor(due), []).append(latency * 1000)
        return "  ".join(f"{s}:{percentile(v, 0.99):.0f}({max(v):.0f})" for s, v in sorted(seconds.items()))


# -- the load generator (its own process) -----------------------------------------------------------------


def _cpu_time() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loadgen_process(spec: LoadSpec, conn: Connection) -> None:
    import uvloop

    try:
        result = uvloop.run(_loadgen(spec, conn))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    conn.send(("result", result))


async def _loadgen(spec: LoadSpec, conn: Connection) -> LoadResult:
    prebuilt: list[bytes] = []
    if spec.kind == "single":
        prebuilt = [spec.single_body(i) for i in range(int(PREBUILD_RATE * (spec.warmup + spec.duration)))]
    matched = [spec.matched_body(j) for j in range(len(spec.matched))]
    matched_used = 0
    keys = [f"{spec.tag}-{i}" for i in range(len(prebuilt))]
    result = LoadResult(name=spec.name, window=spec.duration)
    expected = 201 if spec.kind == "single" else 200
    # The gateway's own upstream client (keep-alive connections, answers parsed by httptools): on this 2-core
    # machine every µs the generator spends is taken from the system it measures, and aiohttp's client cost
    # 110-170 µs a request.
    transport = RawTransport(pool_size=spec.concurrency, upstreams=1, connect_timeout=10, timeout=120, keepalive=3600)
    headers = {**spec.headers, "Content-Type": "application/json"}
    try:
        start = time.monotonic()
        window_start, window_end = start + spec.warmup, start + spec.warmup + spec.duration
        conn.send(("started", start))
        counter = itertools.count()

        def body_of(i: int) -> tuple[bytes, dict[str, str]]:
            nonlocal matched_used
            if spec.kind == "batch":
                return spec.batch_body(i), {}
            key = keys[i] if i < len(keys) else f"{spec.tag}-{i}"
            share = (time.monotonic() - start) / (spec.warmup + spec.duration)
            if matched_used < len(matched) * share:
                matched_used += 1
                return matched[matched_used - 1], {"Idempotency-Key": key}
            if i < len(prebuilt):
                return prebuilt[i], {"Idempotency-Key": key}
            result.bodies_built_late += 1
            return spec.single_body(i), {"Idempotency-Key": key}

        def account(status: int, payload: bytes, sent: float, done: float) -> None:
            in_window = window_start <= done < window_end
            result.timeline.append((sent - window_start, done - sent))
            if status != expected:
                result.errors += 1
                result.errors_in_window += in_window
                result.error_samples[f"{status} {payload[:160].decode(errors='replace')}"] += 1
                return
            if spec.kind == "single":
                result.statuses[json.loads(payload).get("status", "?")] += 1
                accepted = 1
            else:
                items = Counter(item["status"] for item in json.loads(payload)["results"])
                result.statuses.update(items)
                accepted = sum(n for status_, n in items.items() if status_ != "rejected")
                if items["rejected"]:
                    result.items_rejected += items["rejected"]
                    result.error_samples["batch item rejected"] += items["rejected"]
            result.accepted_total += accepted
            if in_window:
                result.ok_in_window += 1
                result.items_in_window += accepted
                result.latencies.append(done - sent)

        async def send(i: int, sent: float) -> None:
            body, extra = body_of(i)
            result.requests += 1
            try:
                status, _, payload = await transport.send("POST", spec.url, {**headers, **extra}, body)
            except (UpstreamUnreachable, UpstreamTimeout) as exc:
                status, payload = -1, f"{type(exc).__name__}: {exc}".encode()
            account(status, payload, sent, time.monotonic())

        async def worker() -> None:
            while time.monotonic() < window_end:
                await send(next(counter), time.monotonic())

        async def paced() -> None:
            in_flight: set[asyncio.Task[None]] = set()
            for i in itertools.count():
                due = start + i / spec.rate
                if due >= window_end:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                task = asyncio.create_task(send(next(counter), due))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.gather(*in_flight)

        async def cpu_meter() -> None:
            await asyncio.sleep(max(0.0, window_start - time.monotonic()))
            before = _cpu_time()
            await asyncio.sleep(max(0.0, window_end - time.monotonic()))
            result.cpu_seconds = _cpu_time() - before

        senders = [paced()] if spec.rate else [worker() for _ in range(spec.concurrency)]
        await asyncio.gather(cpu_meter(), *senders)
    finally:
        await transport.close()
    return result


async def _receive(conn: Connection) -> Any:
    """``conn.recv()`` without blocking the event loop (nor a thread that Ctrl-C could not stop)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), readable)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv()


# -- who uses the CPU -------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU ticks used) of a process, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12])


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _proc_stat(int(entry.name))) is not None and st[0] == pid:
            found.append(int(entry.name))
    return found


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


Thread = tuple[int, int]  # (pid, tid)
K = TypeVar("K")


def _schedstats() -> tuple[dict[Thread, int], dict[Thread, int]]:
    """Of every thread now on the machine, since it started (``/proc/<pid>/task/<tid>/schedstat``), in one pass:
    the nanoseconds it spent runnable but waiting for a CPU (second field), and how many times it was put on a
    CPU (third field: a wake-up, or a turn after a preemption). Their growth over a span, per second, is how many
    threads waited for a CPU on average (what a busy figure near the machine's cores cannot say), and how often
    each process was woken."""
    waits: dict[Thread, int] = {}
    runs: dict[Thread, int] = {}
    for stat in Path("/proc").glob("[0-9]*/task/[0-9]*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().split()
            thread = (int(stat.parent.parent.parent.name), int(stat.parent.name))
            waits[thread], runs[thread] = int(fields[1]), int(fields[2])
    return waits, runs


def grown_since(before: Mapping[K, int], now: Mapping[K, int]) -> dict[K, int]:
    """Each thread's counter's growth between two readings, for the threads alive at the end. Thread by thread: a
    total would lose the whole lifetime's count of every thread that ended meanwhile (another test's server
    shutting down could cancel the span out). A thread id seen lower than before is a new thread: all of it."""
    return {k: n - before.get(k, 0) if n >= before.get(k, 0) else n for k, n in now.items()}


class CpuMeter:
    """CPU used by named groups of processes between :meth:`start` and :meth:`stop`, in cores; and how many
    threads of the machine waited for a CPU, on average (an oversubscribed machine queues every request)."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self._groups = groups
        self._before: dict[int, int] = {}
        self._machine: tuple[int, int] = (0, 0)
        self._started = 0.0
        self._waits: dict[Thread, int] = {}
        self._runs: dict[Thread, int] = {}
        self.cores: dict[str, float] = {}
        self.runs: dict[str, int] = {}  # times a thread of each group was put on a CPU in the span
        self.machine_busy = 0.0
        self.waiting = 0.0  # threads runnable but waiting for a CPU, on average

    def add_group(self, name: str, pids: Callable[[], list[int]]) -> None:
        self._groups[name] = pids

    def _snapshot(self) -> dict[int, tuple[str, int]]:
        snap: dict[int, tuple[str, int]] = {}
        for group, pids in self._groups.items():
            for pid in pids():
                if (st := _proc_stat(pid)) is not None:
                    snap[pid] = (group, st[1])
        return snap

    def start(self) -> None:
        self._before = {pid: ticks for pid, (_, ticks) in self._snapshot().items()}
        self._machine = _machine_ticks()
        self._waits, self._runs = _schedstats()
        self._started = time.monotonic()

    def stop(self) -> None:
        elapsed = time.monotonic() - self._started
        busy, total = _machine_ticks()
        # Threads that ended meanwhile take their span's counts with them: an undercount, never more than was.
        waits, runs_now = _schedstats()
        self.waiting = sum(grown_since(self._waits, waits).values()) / 1e9 / elapsed
        self.machine_busy = (busy - self._machine[0]) / max(1, total - self._machine[1]) * (os.cpu_count() or 1)
        used: Counter[str] = Counter()
        group_of: dict[int, str] = {}
        for pid, (group, ticks) in self._snapshot().items():
            used[group] += ticks - self._before.get(pid, 0)
            group_of[pid] = group
        runs: Counter[str] = Counter()
        for (pid, _), n in grown_since(self._runs, runs_now).items():
            if pid in group_of:
                runs[group_of[pid]] += n
        self.cores = {group: used[group] / _TICK / elapsed for group in self._groups}
        self.runs = {group: runs[group] for group in self._groups}

    @property
    def others(self) -> float:
        """Cores used by processes that are not part of the measurement (another job on the machine)."""
        return max(0.0, self.machine_busy - sum(self.cores.values()))

    def line(self) -> str:
        parts = [f"{group} {cores:.2f}" for group, cores in self.cores.items()]
        return (
            f"CPU (cores): {', '.join(parts)}, not ours {self.others:.2f}; "
            f"machine busy {self.machine_busy:.2f} of {os.cpu_count()}, "
            f"threads waiting for a CPU {self.waiting:.1f} on average"
        )

    def runs_line(self, requests: int) -> str:
        """How often each group's threads were put on a CPU, per request: requests that arrive one at a time wake
        every process on their path for each, where a burst shares the wake-ups."""
        per = max(requests, 1)
        parts = [f"{group} {n / per:.1f}" for group, n in self.runs.items() if n]
        return f"put on a CPU a request (wake-ups and turns): {', '.join(parts)}"


class WalMeter:
    """What PostgreSQL wrote to its WAL between :meth:`start` and :meth:`stop` (``pg_stat_wal``), and the
    checkpoints that ended meanwhile. A full-page image is a whole 8 kB page written to the WAL again: the first
    change to a page after each checkpoint, so checkpoints that come often make every change dearer. A flush is
    one ``fdatasync`` of the WAL: a commit waits for one, and commits that wait at the same moment share it."""

    _QUERY = (
        "SELECT w.wal_bytes::bigint, w.wal_fpi, w.wal_sync, b.checkpoints_timed + b.checkpoints_req "
        "FROM pg_stat_wal w, pg_stat_bgwriter b"
    )

    def __init__(self, pg: PostgresServer) -> None:
        self._pg = pg
        self._before = (0, 0, 0, 0)
        self.bytes = self.full_pages = self.flushes = self.checkpoints = 0

    def _read(self) -> tuple[int, int, int, int]:
        wal_bytes, full_pages, flushes, checkpoints = (int(v) for v in self._pg.execute(self._QUERY).strip().split("|"))
        return wal_bytes, full_pages, flushes, checkpoints

    async def start(self) -> None:
        self._before = await asyncio.to_thread(self._read)

    async def stop(self) -> None:
        after = await asyncio.to_thread(self._read)
        self.bytes, self.full_pages, self.flushes, self.checkpoints = (
            a - b for a, b in zip(after, self._before, strict=True)
        )

    def line(self, doses: int) -> str:
        per = max(doses, 1)
        return (
            f"WAL (whole server): {self.bytes / per / 1024:.2f} kB a dose accepted, "
            f"{self.flushes * 1000 / per:.0f} flushes and "
            f"{self.full_pages * 1000 / per:.0f} full-page images a 1,000 doses; "
            f"{self.checkpoints} checkpoint{'s' if self.checkpoints != 1 else ''} ended"
        )


async def machine_busy(seconds: float) -> float:
    """Cores busy on the whole machine over the next ``seconds``."""
    busy, total = _machine_ticks()
    await asyncio.sleep(seconds)
    busy2, total2 = _machine_ticks()
    return (busy2 - busy) / max(1, total2 - total) * (os.cpu_count() or 1)


def dirty_bytes() -> int:
    """Data in the page cache that processes wrote and the kernel has not yet written to disk (``/proc/meminfo``:
    Dirty and Writeback)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[name].split()[0]) * 1024 for name in ("Dirty", "Writeback"))


def pg_defaults_option(parser: argparse.ArgumentParser) -> None:
    """``--pg-defaults``, for a bench whose PostgreSQL otherwise runs with production's parameters."""
    parser.add_argument(
        "--pg-defaults",
        action="store_true",
        help="PostgreSQL with its own defaults, not production's memory and WAL parameters (deploy/k8s)",
    )


def pg_parameters_line(defaults: bool) -> str:
    """Which parameters the bench's PostgreSQL runs with, for its report."""
    if defaults:
        return "PostgreSQL: its defaults (--pg-defaults)"
    return "PostgreSQL: production's " + ", ".join(f"{k} {v}" for k, v in production_pg_parameters().items())


def describe_write_back(size: int, seconds: float) -> str:
    return f"{size / 1e6:.0f} MB in {seconds:.1f} s"


async def write_back() -> tuple[int, float]:
    """Write the page cache's dirty data to disk now (``sync``): the bytes that were dirty, and the seconds it took.

    The kernel writes a file's dirty pages back some 30 s after they were first dirtied, all at once
    (``vm.dirty_expire_centisecs``). The batch phases dirty 15-20 MB a second (new table and index pages, Kafka's
    segments), so 150-300 MB went to the disk in one go in the middle of the next phase; every commit's WAL flush
    waited behind it on this machine's one disk, and the requests of that moment took 100-200 ms instead of 20.
    Before a phase, then, what the earlier ones left is written first, as their backlog is drained first. (In
    production the WAL has a volume of its own: ``walStorage`` in ``deploy/k8s``.)"""
    dirty, started = dirty_bytes(), time.monotonic()
    await asyncio.to_thread(os.sync)
    return dirty, time.monotonic() - started


async def wait_quiet(limit: float, timeout: float) -> None:
    """Wait (up to ``timeout`` s) until the machine is nearly idle: numbers taken beside another job are noise."""
    started = time.monotonic()
    while (busy := await machine_busy(1.0)) > limit:
        if time.monotonic() - started > timeout:
            say(f"  the machine is still busy ({busy:.2f} cores): measuring anyway; see 'not ours' below")
            return
        say(f"  the machine is busy ({busy:.2f} cores in use, not by this bench's load): waiting ...")


# -- the system under test --------------------------------------------------------------------------------


@dataclass
class System:
    tmp: Path
    pg: PostgresServer
    kafka: KafkaServer
    stack: Stack
    env: dict[str, str]
    baseline: subprocess.Popen[bytes] | None = None
    baseline_port: int = 0
    proxy: Stack | None = None  # a second gateway whose "records" is the baseline

    def gateway(self) -> str:
        return self.stack.url()

    def pg_pids(self) -> list[int]:
        pid = self.pg.pid
        return [] if pid is None else [pid, *children_of(pid)]

    def pids(self, *names: str) -> Callable[[], list[int]]:
        """The processes of these services and workers, with their children (uvicorn's worker processes)."""

        def pids() -> list[int]:
            found = [p.pid for n, p in self.stack.processes.items() if n in names]
            return found + [child for pid in found for child in children_of(pid)]

        return pids

    def kafka_pids(self) -> list[int]:
        pid = self.kafka.pid
        return [] if pid is None else [pid]


# PostgreSQL's statement profile (``--pg-statements``): what each phase cost the database, statement by statement.
PG_STATEMENTS = {"shared_preload_libraries": "'pg_stat_statements'", "pg_stat_statements.track": "all"}


def reset_statements(pg: PostgresServer) -> None:
    pg.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()")


def top_statements(pg: PostgresServer, limit: int = 12) -> list[str]:
    """The statements that took most of the database's time since :func:`reset_statements`."""
    out = pg.execute(
        "SELECT round(total_exec_time)::bigint, calls, round((total_exec_time / greatest(calls, 1))::numeric, 3), "
        "d.datname, regexp_replace(left(query, 110), '\\s+', ' ', 'g') FROM pg_stat_statements s "
        "JOIN pg_database d ON d.oid = s.dbid ORDER BY total_exec_time DESC LIMIT " + str(limit)
    )
    return [
        "{:>8} ms {:>8} calls {:>8} ms/call  {:<14} {}".format(*line.split("|", 4))
        for line in out.splitlines()
        if line.count("|") >= 4
    ]


def start_infrastructure(
    tmp: Path, cleanup: contextlib.ExitStack, *, pg_settings: dict[str, str] | None = None, production_pg: bool = True
) -> tuple[PostgresServer, KafkaServer]:
    """PostgreSQL (with production's :data:`~devtools.harness.postgres.SERVER_PARAMETERS` unless
    ``production_pg`` is false, then with PostgreSQL's defaults; ``pg_settings`` on top) and Kafka, both started."""
    from concurrent.futures import ThreadPoolExecutor

    from devtools.harness import free_port
    from devtools.harness.kafka import KafkaServer
    from devtools.harness.postgres import PostgresServer, production_pg_settings

    logs = tmp / "log"
    logs.mkdir(parents=True, exist_ok=True)
    settings = (production_pg_settings() if production_pg else {}) | (pg_settings or {})
    pg = PostgresServer(tmp / "postgres", free_port(), log_path=logs / "postgres.log", settings=settings)
    kafka = KafkaServer(tmp / "kafka", free_port(), free_port(), log_path=logs / "kafka.log")
    cleanup.callback(pg.stop)
    cleanup.callback(kafka.stop)
    with ThreadPoolExecutor(1) as pool:  # initdb and the JVM's start overlap
        started = pool.submit(pg.start)
        kafka.start()
        started.result()
    return pg, kafka


def start_system(
    tmp: Path,
    cleanup: contextlib.ExitStack,
    *,
    pg_settings: dict[str, str] | None = None,
    production_pg: bool = True,
    workers: bool = False,
    env: dict[str, str] | None = None,
    replicas: dict[str, int] | None = None,
) -> System:
    """The four services on a fresh PostgreSQL and Kafka; with ``workers``, in production's shape (relays and
    consumers as processes of their own, :data:`devtools.stack.WORKERS`), else each inside its service;
    ``replicas``: uvicorn worker processes of a service (one by default)."""
    from devtools.harness import free_port
    from devtools.launcher import Stack
    from devtools.stack import SERVICES, WORKERS, WORKERS_ENV, postgres_databases, postgres_env, wiring_env

    say("starting PostgreSQL and Kafka ...")
    pg, kafka = start_infrastructure(tmp, cleanup, pg_settings=pg_settings, production_pg=production_pg)
    for name in [*postgres_databases(), "bench_baseline"]:
        pg.create_database(name)
    kafka.create_topic("dose-events", 4)
    ports = {spec.name: free_port() for spec in SERVICES}
    env = {
        **os.environ,
        **UNLIMITED_CALLER,
        **(env or {}),
        "VRS_VAR_DIR": str(tmp / "var"),
        "VRS_ENVIRONMENT": "test",
        **postgres_env(pg.dsn, kafka_bootstrap=kafka.bootstrap_servers),
        **wiring_env(ports),
        **(WORKERS_ENV if workers else {}),
    }
    say("migrating ...")
    subprocess.run([sys.executable, "-m", "shared.cli", "migrate"], env=env, check=True)
    stack = Stack(env=env, ports=ports, log_dir=tmp / "stack" / "log", replicas=dict(replicas or {}))
    cleanup.callback(stack.stop)
    say("starting the services ...")
    try:
        stack.start(timeout=60)
        for name, args in WORKERS.items() if workers else ():
            stack.start_worker(name, *args)
    except BaseException:
        dump_logs(stack.log_dir)
        raise
    return System(tmp=tmp, pg=pg, kafka=kafka, stack=stack, env=env)


def start_baseline(system: System, cleanup: contextlib.ExitStack) -> None:
    """The bare FastAPI + asyncpg app, and a second gateway that fronts it as 'records'."""
    from devtools.harness import free_port
    from devtools.harness.postgres import SUPERUSER
    from devtools.launcher import Stack

    port = free_port()
    log_path = system.tmp / "log" / "baseline.log"
    env = {
        **system.env,
        "VRS_BENCH_BASELINE_DSN": f"postgresql://{SUPERUSER}@127.0.0.1:{system.pg.port}/bench_baseline",
    }
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "devtools.bench.baseline:app",
                "--host", "127.0.0.1", "--port", str(port),
                "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    system.baseline, system.baseline_port = process, port

    def stop_baseline() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    cleanup.callback(stop_baseline)
    wait_http(f"http://127.0.0.1:{port}/healthz", process, log_path)

    # Its own directory: Stack keeps pid files next to its logs and ends a leftover "gateway" it finds there.
    proxy_env = {**system.env, "VRS_GATEWAY_RECORDS_URL": f"http://127.0.0.1:{port}"}
    proxy = Stack(env=proxy_env, ports={"gateway": free_port()}, log_dir=system.tmp / "proxy" / "log")
    cleanup.callback(proxy.stop)
    proxy.log_dir.mkdir(parents=True, exist_ok=True)
    proxy.start_service("gateway")
    proxy.wait_healthy("gateway", timeout=60)
    system.proxy = proxy


def wait_http(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 30) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(url, timeout=2) as response,  # noqa: S310 (loopback)
        ):
            if response.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def dump_logs(log_dir: Path) -> None:
    for log in sorted(log_dir.glob("*.log")):
        sys.stderr.write(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}\n")


# -- the measurements ------------------------------------------------------------------------------------


def bearer(**claims: Any) -> dict[str, str]:
    """A development identity token for the gateway (its maximum lifetime: re-mint for runs over an hour)."""
    from devtools.tokens import identity_token

    return {"Authorization": f"Bearer {identity_token(**claims)}"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Lags:
    values: list[float] = field(default_factory=list)
    timeouts: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        if not self.values:
            return f"no sample (timeouts {self.timeouts})"
        ms = [v * 1000 for v in self.values]
        text = (
            f"p50 {percentile(ms, 0.5):6.1f} ms  p99 {percentile(ms, 0.99):6.1f} ms  "
            f"max {max(ms):6.1f} ms  (n={len(ms)})"
        )
        if self.timeouts or self.errors:
            text += f"  timeouts {self.timeouts}, errors {sum(self.errors.values())}"
        return text


class Prober:
    """Sequential lag probes: one dose in a (municipality, date) cell of its own, then poll the stats."""

    def __init__(self, session: aiohttp.ClientSession, gateway: str, tag: str) -> None:
        from shared.auth import Role

        self._session = session
        self._gateway = gateway
        self._tag = tag
        self._clinic = {**bearer(role=Role.INSTITUTION, institution=INSTITUTION), "Content-Type": "application/json"}
        self._national = bearer(role=Role.NATIONAL)
        self._serial = itertools.count()
        self.accepted = 0

    async def probe(self, lags: Lags, *, poll_interval: float, timeout: float = 30.0) -> None:
        n = next(self._serial)
        day = PROBE_FIRST_DAY + timedelta(days=n)
        body = json.dumps(dose_doc(PROBE_MUNICIPALITY, coupon_number(PHASE_PROBE, n), day, n)).encode()
        headers = {**self._clinic, "Idempotency-Key": f"{self._tag}-probe-{n}"}
        for attempt in range(2):
            try:
                async with self._session.post(self._gateway + DOSE_PATH, data=body, headers=headers) as response:
                    payload, status = await response.read(), response.status
                break
            except aiohttp.ServerDisconnectedError:
                # A kept-alive connection the server closed as the probe reused it (after an idle stretch):
                # sent again on a new one, which the idempotency key makes safe.
                if attempt:
                    raise
        if status != 201:
            lags.errors[f"POST {status} {payload[:120]!r}"] += 1
            return
        accepted = time.monotonic()
        self.accepted += 1
        params = {
            "group_by": "date",
            "from": day.isoformat(),
            "to": day.isoformat(),
            "municipality": PROBE_MUNICIPALITY,
        }
        while True:
            async with self._session.get(self._gateway + STATS_PATH, params=params, headers=self._national) as r:
                payload = await r.read()
                status = r.status
            seen = time.monotonic()
            if status != 200:
                lags.errors[f"GET stats {status} {payload[:120]!r}"] += 1
                return
            if any(row["count"] >= 1 for row in json.loads(payload)["rows"]):
                lags.values.append(seen - accepted)
                return
            if seen - accepted > timeout:
                lags.timeouts += 1
                return
            await asyncio.sleep(poll_interval)


async def run_load(
    spec: LoadSpec, meter: CpuMeter | None, alongside: Callable[[float, float], Awaitable[None]] | None = None
) -> LoadResult:
    """Run the generator in its own process; ``alongside(window_start, window_end)`` runs meanwhile."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_loadgen_process, args=(spec, theirs), name=f"loadgen-{spec.name}", daemon=True)
    process.start()
    theirs.close()  # so that its death reads as EOF here
    if meter is not None:
        meter.add_group("loadgen", lambda: [process.pid] if process.pid else [])
    try:
        kind, start = await _receive(ours)
        if kind != "started":
            raise RuntimeError(f"load generator failed:\n{start}")
        window_start, window_end = start + spec.warmup, start + spec.warmup + spec.duration

        async def metered() -> None:
            await asyncio.sleep(max(0.0, window_start - time.monotonic()))
            if meter is not None:
                meter.start()
            await asyncio.sleep(max(0.0, window_end - time.monotonic()))
            if meter is not None:
                meter.stop()

        side = [alongside(window_start, window_end)] if alongside is not None else []
        await asyncio.gather(metered(), *side)
        kind, payload = await _receive(ours)
        if kind != "result":
            raise RuntimeError(f"load generator failed:\n{payload}")
        result: LoadResult = payload
        return result
    finally:
        if process.is_alive():
            process.terminate()
        process.join(10)
        ours.close()


async def seed_residents(
    session: aiohttp.ClientSession, gateway: str, count: int
) -> tuple[list[tuple[str, str]], float]:
    """PUT ``count`` residents (spread over the municipalities) through the gateway; their coupons, and the rate."""
    from shared.auth import Role

    tokens = {code: bearer(role=Role.MUNICIPALITY, municipality=code) for code in MUNICIPALITIES}
    people = [(MUNICIPALITIES[n % len(MUNICIPALITIES)], coupon_number(PHASE_RESIDENT, n), n) for n in range(count)]
    queue = iter(people)
    problems: Counter[str] = Counter()

    async def worker() -> None:
        for code, number, n in queue:
            body = {
                "name": "佐藤 花子" if n % 2 else "鈴木 太郎",
                "name_kana": "サトウ ハナコ" if n % 2 else "スズキ タロウ",
                "birth_date": (date(1935, 1, 1) + timedelta(days=(n * 97) % (365 * 70))).isoformat(),
                "sex": "F" if n % 2 else "M",
                "coupon_number": number,
            }
            url = f"{gateway}/api/v1/municipalities/{code}/residents/bench-{n}"
            async with session.put(url, json=body, headers=tokens[code]) as response:
                if response.status != 201:
                    problems[f"{response.status} {(await response.read())[:160]!r}"] += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(16)))
    elapsed = time.monotonic() - started
    if problems:
        raise RuntimeError(f"seeding residents failed: {dict(problems)}")
    return [(code, number) for code, number, _ in people], count / elapsed


CSV_HEADER = "client_id,coupon,dose_number,vaccinated_on,vaccine,lot_number,venue,doctor,medical_worker\n"


def dose_csv(tag: str, rows: int) -> bytes:
    """A mass vaccination site's day: ``rows`` doses of coupons nobody holds yet, as ``vrs doses import`` sends."""
    lines = [CSV_HEADER]
    for i in range(rows):
        d = dose_doc(MUNICIPALITIES[i % len(MUNICIPALITIES)], coupon_number(PHASE_CSV, i),
                     LOAD_FIRST_DAY + timedelta(days=i % LOAD_DAYS), i)  # fmt: skip
        lines.append(f"{tag}-csv-{i},{d['coupon']},1,{d['vaccinated_on']},{d['vaccine']},{d['lot_number']},"
                     f"{d['venue']},,false\n")  # fmt: skip
    return "".join(lines).encode()


@dataclass
class CsvImport:
    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    seconds: float = 0.0  # POST sent → GET says done
    error: str = ""

    @property
    def rate(self) -> float:
        return self.rows_ok / self.seconds if self.seconds else 0.0


async def import_csv(session: aiohttp.ClientSession, gateway: str, tag: str, rows: int) -> CsvImport:
    """Upload a dose CSV through the gateway and follow it until done."""
    from shared.auth import Role

    clinic = bearer(role=Role.INSTITUTION, institution=INSTITUTION)
    body = dose_csv(tag, rows)
    result = CsvImport(rows=rows)
    started = time.monotonic()
    headers = {**clinic, "Content-Type": "text/csv"}
    async with session.post(gateway + "/api/v1/dose-imports", data=body, headers=headers) as response:
        if response.status != 202:
            result.error = f"POST {response.status} {(await response.read())[:200]!r}"
            return result
        import_id = (await response.json())["import_id"]
    while True:
        async with session.get(f"{gateway}/api/v1/dose-imports/{import_id}", headers=clinic) as response:
            state = await response.json()
        if state.get("status") in ("done", "failed") or time.monotonic() - started > 600:
            break
        await asyncio.sleep(0.05)
    result.seconds = time.monotonic() - started
    result.rows_ok, result.rows_failed = state.get("rows_ok", 0), state.get("rows_failed", 0)
    if state.get("status") != "done":
        result.error = f"import ended as {state}"
    return result


async def stats_total(session: aiohttp.ClientSession, gateway: str) -> int:
    async with session.get(gateway + STATS_PATH) as response:
        response.raise_for_status()
        rows = (await response.json())["rows"]
    return sum(int(row["count"]) for row in rows)


@dataclass
class Drain:
    seconds: float
    expected: int
    seen: int

    def describe(self) -> str:
        if self.seen == self.expected:
            return f"{self.seconds:.1f} s after the load ended (stats total {self.seen} = doses accepted)"
        if self.seen > self.expected:
            return f"stats total {self.seen} > doses accepted {self.expected}: counted twice, or accepted unseen"
        return f"NOT drained after {self.seconds:.0f} s: stats total {self.seen}, doses accepted {self.expected}"


async def wait_drained(session: aiohttp.ClientSession, gateway: str, expected: int, timeout: float = 90) -> Drain:
    """Until the public total counts every accepted dose (fewer: still in flight; more: counted twice)."""
    started = time.monotonic()
    seen = -1
    while time.monotonic() - started < timeout:
        seen = await stats_total(session, gateway)
        if seen >= expected:
            break
        await asyncio.sleep(0.05)
    return Drain(time.monotonic() - started, expected, seen)
