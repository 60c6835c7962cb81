"""``make bench``: throughput and lag of VRS on PostgreSQL (2 shards) + Kafka, next to this machine's ceiling.

Starts a throwaway PostgreSQL and Kafka (the test harness, temporary directories, free ports), migrates,
starts the four services as ``make run-full`` does, seeds residents through the gateway, then measures:

- single-dose ``POST /api/v1/doses`` through the gateway, closed loop (32 connections), with the
  accepted→visible lag sampled alongside;
- the ceiling of PERFORMANCE.md in the same run with the same load generator: a bare FastAPI + asyncpg
  ``INSERT ... RETURNING`` (``devtools.bench.baseline``), directly and behind a second gateway;
- ``POST /api/v1/doses/batch`` (1,000 per request), beside the baseline's own batch endpoint (one multi-row
  ``INSERT`` per request) as its ceiling;
- a dose CSV import (``POST /api/v1/dose-imports``, followed until done), beside the same batch ceiling;
- an open-loop run at 80% of the single-dose rate just measured, printing its p99 (latency from when each
  request was due, so queueing shows);
- accepted→visible lag on an idle system: a dose's 201 until ``GET /api/v1/stats/doses`` counts it.

After every load the public statistics must count exactly the doses accepted (printed as "backlog ...").

The load generator runs in a process of its own (aiohttp, one session, pre-built bodies); its CPU use is
printed with everyone else's, so a generator that became the bottleneck shows. A program that prints
numbers, not a test: every non-2xx answer is counted and printed, never dropped.

    python -m devtools.bench records [--duration 12] [--warmup 2] [--probes 200] [--csv-rows 20000] [--keep]
        [--records-workers 1] [--worker-processes] [--pg-statements] [--only single,lag,batch,later,csv,fixed]
        [--profile DIR] [--pg-defaults] [--no-write-back]

PostgreSQL runs with production's memory and WAL parameters (``deploy/k8s``; ``--pg-defaults``: its own), and
each VRS phase prints what the server wrote to its WAL per dose accepted.

Before each phase the bench waits until stats counts every dose accepted so far (printed as "settled"), so
that a phase never measures the previous one's backlog, and then has the kernel write what the earlier phases
left dirty in the page cache (``sync``; ``--no-write-back``: not), so that a phase never waits behind the
previous one's disk writes either. ``--profile DIR`` runs py-spy on records' and stats'
processes during each load phase and prints their top lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from devtools.bench.profile import Profiles
from devtools.harness import scratch_directory
from devtools.stack import WORKERS

if TYPE_CHECKING:
    pass

from devtools.bench.core import (
    DOSE_PATH,
    INSTITUTION,
    PG_STATEMENTS,
    PHASE_BASELINE,
    PHASE_BATCH,
    PHASE_FIXED,
    PHASE_MAX_AGAIN,
    PHASE_SINGLE,
    CpuMeter,
    CsvImport,
    Drain,
    Lags,
    LoadResult,
    LoadSpec,
    Prober,
    System,
    WalMeter,
    bearer,
    children_of,
    describe_write_back,
    dump_logs,
    import_csv,
    percentile,
    pg_defaults_option,
    pg_parameters_line,
    reset_statements,
    run_load,
    say,
    seed_residents,
    start_baseline,
    start_system,
    top_statements,
    wait_drained,
    wait_quiet,
    write_back,
)

PHASES = ("single", "lag", "batch", "later", "csv", "fixed")

# -- the run ----------------------------------------------------------------------------------------------


@dataclass
class Report:
    postgres: str = ""
    kafka: str = ""
    seeded: int = 0
    seed_rate: float = 0.0
    single: LoadResult | None = None
    single_cpu: CpuMeter | None = None
    lag_load: Lags = field(default_factory=Lags)
    drain_single: Drain | None = None
    lag_idle: Lags = field(default_factory=Lags)
    batch: LoadResult | None = None
    batch_cpu: CpuMeter | None = None
    drain_batch: Drain | None = None
    later: LoadResult | None = None
    later_cpu: CpuMeter | None = None
    drain_later: Drain | None = None
    baseline: LoadResult | None = None
    baseline_cpu: CpuMeter | None = None
    proxied: LoadResult | None = None
    proxied_cpu: CpuMeter | None = None
    batch_baseline: LoadResult | None = None
    batch_baseline_cpu: CpuMeter | None = None
    csv: CsvImport | None = None
    drain_csv: Drain | None = None
    max_again: LoadResult | None = None  # the single-dose max measured again just before the fixed-rate run
    max_again_cpu: CpuMeter | None = None
    fixed: LoadResult | None = None
    fixed_cpu: CpuMeter | None = None
    drain_fixed: Drain | None = None
    wal: dict[str, WalMeter] = field(default_factory=dict)  # by phase (the load's name)
    statements: dict[str, list[str]] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)
    settle: list[float] = field(default_factory=list)  # seconds waited for the backlog before each phase
    written_back: list[tuple[int, float]] = field(default_factory=list)  # (bytes, seconds) synced before each phase


def load_line(label: str, result: LoadResult | None) -> str:
    if result is None:
        return f"{label:<34} not measured"
    ms = [v * 1000 for v in result.latencies]
    return (
        f"{label:<34} {result.rate:8.0f} req/s  p50 {percentile(ms, 0.5):6.1f} ms  "
        f"p99 {percentile(ms, 0.99):6.1f} ms  errors {result.errors}"
    )


def details(result: LoadResult | None, meter: CpuMeter | None, wal: WalMeter | None = None) -> list[str]:
    if result is None:
        return []
    lines = [
        f"    {result.requests} requests sent, {result.ok_in_window} answered OK in the {result.window:.0f} s window; "
        f"generator CPU {result.cpu_seconds / result.window:.2f} cores"
        + (f"; {result.bodies_built_late} bodies built late" if result.bodies_built_late else "")
    ]
    if result.statuses:
        lines.append(f"    dose statuses: {dict(sorted(result.statuses.items()))}")
    if meter is not None and meter.cores:
        lines.append(f"    {meter.line()}")
        lines.append(f"    {meter.runs_line(result.ok_in_window)}")
    if wal is not None:
        lines.append(f"    {wal.line(result.accepted_total)}")
    for sample, n in result.error_samples.most_common(5):
        lines.append(f"    ERROR x{n}: {sample}")
    return lines


def fixed_max(report: Report, args: argparse.Namespace) -> float:
    """What the open-loop run's rate is a share of: ``--fixed-rate``, else the single-dose max measured just
    before it (the database then holds every earlier phase's doses: its first measurement did not)."""
    if args.fixed_rate is not None:
        return float(args.fixed_rate)
    return report.max_again.rate if report.max_again is not None else 0.0


def fixed_rate(report: Report, args: argparse.Namespace) -> float:
    return fixed_max(report, args) * float(args.fixed_share)


def render(report: Report, args: argparse.Namespace) -> str:
    cores = len(os.sched_getaffinity(0))
    single, baseline, batch = report.single, report.baseline, report.batch
    lines = [
        "",
        f"VRS bench — PostgreSQL {report.postgres} (2 shards) + Kafka {report.kafka}, {cores} cores, "
        f"{args.concurrency} connections, {args.duration:.0f} s (+{args.warmup:.0f} s warm-up), "
        f"records as {args.records_workers} process{'es' if args.records_workers > 1 else ''}, relays and consumers "
        + ("as processes of their own" if args.worker_processes else "inside the services"),
        pg_parameters_line(args.pg_defaults),
        "",
        load_line("single dose POST via gateway", single),
        *details(single, report.single_cpu, report.wal.get("single")),
        load_line("baseline FastAPI+asyncpg INSERT", baseline),
        *details(baseline, report.baseline_cpu),
        load_line("baseline behind a 2nd gateway", report.proxied),
        *details(report.proxied, report.proxied_cpu),
    ]
    if single is not None and baseline is not None and baseline.rate:
        ratio = f"{single.rate / baseline.rate:.2f}"
        if report.proxied is not None and report.proxied.rate:
            ratio += f"   (VRS / gateway+baseline {single.rate / report.proxied.rate:.2f})"
        lines.append(f"{'ratio VRS / ceiling':<34} {ratio}")
    for label, result, meter, wal in (
        (f"batch ({args.batch_size}/req) via gateway", batch, report.batch_cpu, report.wal.get("batch")),
        ("batch of later doses, same size", report.later, report.later_cpu, report.wal.get("later")),
    ):
        if result is None:
            continue
        ms = [v * 1000 for v in result.latencies]
        lines.append(
            f"{label:<34} {result.item_rate:8.0f} doses/s  "
            f"({result.rate:.1f} batches/s, p50 {percentile(ms, 0.5):.0f} ms, p99 {percentile(ms, 0.99):.0f} ms)  "
            f"errors {result.errors} ({result.errors * args.batch_size} doses), {result.items_rejected} items rejected"
        )
        lines += details(result, meter, wal)
    ceiling = report.batch_baseline
    if ceiling is not None:
        lines.append(
            f"{'batch ceiling (baseline, direct)':<34} {ceiling.item_rate:8.0f} doses/s  errors {ceiling.errors}"
        )
        lines += details(ceiling, report.batch_baseline_cpu)
        if batch is not None and ceiling.item_rate:
            lines.append(f"{'ratio VRS batch / batch ceiling':<34} {batch.item_rate / ceiling.item_rate:.2f}")
    csv = report.csv
    if csv is not None:
        lines.append(
            f"{'CSV import via gateway':<34} {csv.rate:8.0f} doses/s  ({csv.rows_ok} of {csv.rows} rows in "
            f"{csv.seconds:.1f} s, {csv.rows_failed} failed){'  ERROR ' + csv.error if csv.error else ''}"
        )
        if ceiling is not None and ceiling.item_rate:
            lines.append(f"{'ratio CSV import / batch ceiling':<34} {csv.rate / ceiling.item_rate:.2f}")
    if report.max_again is not None:
        lines.append(load_line("single-dose max again, just before", report.max_again))
        lines += details(report.max_again, report.max_again_cpu, report.wal.get("max-again"))
    fixed = report.fixed
    if fixed is not None:
        ms = [v * 1000 for v in fixed.latencies]
        lines.append(
            f"{f'fixed rate {args.fixed_share:.0%} of max via gateway':<34} {fixed.rate:8.0f} req/s  "
            f"(asked {fixed_rate(report, args):.0f}/s of {fixed_max(report, args):.0f})  "
            f"p50 {percentile(ms, 0.5):6.1f} ms  p99 {percentile(ms, 0.99):6.1f} ms  errors {fixed.errors}"
        )
        lines += details(fixed, report.fixed_cpu, report.wal.get("fixed"))
        lines.append(f"    p99 (max) ms by second due (warm-up < 0): {fixed.by_second()}")
    lines += [
        f"{'accepted→visible lag (idle)':<34} {report.lag_idle.describe()}",
        f"{'accepted→visible lag (under load)':<34} {report.lag_load.describe()}",
        f"{'backlog after single-dose load':<34} {report.drain_single.describe() if report.drain_single else '-'}",
        f"{'backlog after batch load':<34} {report.drain_batch.describe() if report.drain_batch else '-'}",
        f"{'backlog after later-dose batches':<34} {report.drain_later.describe() if report.drain_later else '-'}",
        f"{'backlog after CSV import':<34} {report.drain_csv.describe() if report.drain_csv else '-'}",
        f"{'backlog after fixed-rate load':<34} {report.drain_fixed.describe() if report.drain_fixed else '-'}",
        f"{'residents seeded (PUT via gateway)':<34} {report.seeded} at {report.seed_rate:.0f}/s",
        f"(lag: 201 received → first GET /api/v1/stats/doses showing the dose; polled every {args.poll_ms:g} ms "
        f"idle, {args.load_poll_ms:g} ms under load)",
    ]
    meters = {
        "single": report.single_cpu,
        "baseline": report.baseline_cpu,
        "gateway+baseline": report.proxied_cpu,
        "batch": report.batch_cpu,
        "later-dose batch": report.later_cpu,
        "batch ceiling": report.batch_baseline_cpu,
        "max again": report.max_again_cpu,
        "fixed-rate": report.fixed_cpu,
    }
    for phase, meter in meters.items():
        if meter is not None and meter.others > 0.25:
            lines.append(
                f"WARNING: other processes used {meter.others:.2f} cores during the {phase} run: its figures are low"
            )
    if report.settle:
        lines.append(
            f"{'waited for earlier backlog':<34} "
            + ", ".join(f"{s:.1f} s" for s in report.settle)
            + " (before each phase)"
        )
    if report.written_back:
        lines.append(
            f"{'then wrote back to disk':<34} "
            + ", ".join(describe_write_back(size, seconds) for size, seconds in report.written_back)
        )
    for phase, top in report.statements.items():
        lines += ["", f"PostgreSQL's busiest statements during the {phase} run (pg_stat_statements):", *top]
    for phase, text in report.profiles.items():
        lines += ["", f"py-spy during the {phase} run:", text]
    for lags, when in ((report.lag_idle, "idle"), (report.lag_load, "under load")):
        for sample, n in lags.errors.most_common(3):
            lines.append(f"    LAG PROBE ERROR ({when}) x{n}: {sample}")
    return "\n".join(lines)


async def measure(system: System, args: argparse.Namespace, cleanup: contextlib.ExitStack, report: Report) -> None:
    from shared.auth import Role

    tag = uuid.uuid4().hex[:8]
    gateway = system.gateway()
    clinic = {**bearer(role=Role.INSTITUTION, institution=INSTITUTION), "Content-Type": "application/json"}
    base = {"concurrency": args.concurrency, "warmup": args.warmup, "duration": args.duration, "headers": clinic}
    batched = {
        "url": gateway + DOSE_PATH + "/batch", "kind": "batch", "phase": PHASE_BATCH, "concurrency": args.batch_clients,
        "warmup": args.warmup, "duration": args.batch_duration, "headers": clinic, "batch_size": args.batch_size,
    }  # fmt: skip
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=32)) as session:
        say(f"seeding {args.residents} residents through the gateway ...")
        matched, report.seed_rate = await seed_residents(session, gateway, args.residents)
        report.seeded = len(matched)

        # The ceiling first, while the VRS services are idle and have no backlog to work off.
        if not args.skip_baseline:
            say("starting the baseline app and a gateway in front of it ...")
            start_baseline(system, cleanup)
            assert system.baseline is not None and system.proxy is not None
            baseline_proc, proxy = system.baseline, system.proxy
            await wait_quiet(args.quiet_cores, args.quiet_wait)
            say("load: baseline FastAPI + asyncpg ...")
            report.baseline_cpu = CpuMeter({"baseline": lambda: [baseline_proc.pid], "postgres": system.pg_pids})
            report.baseline = await run_load(
                LoadSpec(
                    name="baseline", url=f"http://127.0.0.1:{system.baseline_port}{DOSE_PATH}", kind="single",
                    phase=PHASE_BASELINE, tag=f"{tag}-base", **base,
                ),
                report.baseline_cpu,
            )  # fmt: skip
            say(f"  {report.baseline.rate:.0f} req/s")
            await wait_quiet(args.quiet_cores, args.quiet_wait)
            say("load: gateway → baseline ...")
            report.proxied_cpu = CpuMeter(
                {
                    "gateway": lambda: [p.pid for p in proxy.processes.values()],
                    "baseline": lambda: [baseline_proc.pid],
                    "postgres": system.pg_pids,
                }
            )
            report.proxied = await run_load(
                LoadSpec(
                    name="proxied", url=proxy.url() + DOSE_PATH, kind="single", phase=PHASE_BASELINE,
                    tag=f"{tag}-proxied", **base,
                ),
                report.proxied_cpu,
            )  # fmt: skip
            say(f"  {report.proxied.rate:.0f} req/s")
            proxy.stop()
            await wait_quiet(args.quiet_cores, args.quiet_wait)
            say("load: baseline batch (the batch ceiling) ...")
            report.batch_baseline_cpu = CpuMeter({"baseline": lambda: [baseline_proc.pid], "postgres": system.pg_pids})
            report.batch_baseline = await run_load(
                LoadSpec(
                    name="batch-baseline", url=f"http://127.0.0.1:{system.baseline_port}{DOSE_PATH}/batch",
                    kind="batch", phase=PHASE_BASELINE, tag=f"{tag}-bbase", concurrency=args.batch_clients,
                    warmup=args.warmup, duration=args.batch_duration, headers=clinic, batch_size=args.batch_size,
                ),
                report.batch_baseline_cpu,
            )  # fmt: skip
            say(f"  {report.batch_baseline.item_rate:.0f} doses/s")
            baseline_proc.terminate()

        prober = Prober(session, gateway, tag)
        # A service's relay and consumer processes (production's layout) count as the service.
        vrs_groups: dict[str, Callable[[], list[int]]] = {
            name: system.pids(name, *(worker for worker in WORKERS if worker.startswith(f"{name}-")))
            for name in ("gateway", "records", "registry", "stats")
        }
        vrs_groups |= {"postgres": system.pg_pids, "kafka": system.kafka_pids, "bench(probes)": lambda: [os.getpid()]}

        async def probe_under_load(window_start: float, window_end: float) -> None:
            await asyncio.sleep(max(0.0, window_start - time.monotonic()))
            while time.monotonic() < window_end:
                await prober.probe(report.lag_load, poll_interval=args.load_poll_ms / 1000)

        profile = statement_profiler(system, args, report)
        phases = set(args.only.split(",")) if args.only else set(PHASES)
        expected = 0

        async def load(
            spec: LoadSpec, alongside: Callable[[float, float], Awaitable[None]] | None = None
        ) -> tuple[LoadResult, CpuMeter]:
            """One load phase through the gateway, metered and (``--profile``, ``--pg-statements``) profiled."""
            profile(spec.name)
            meter = CpuMeter(dict(vrs_groups))
            wal = report.wal[spec.name] = WalMeter(system.pg)
            await wal.start()
            result = await run_load(spec, meter, alongside)
            await wal.stop()
            profile(spec.name, done=True)
            return result, meter

        async def drained(accepted: int) -> Drain:
            """The phase's backlog: how long until stats counted ``accepted`` more doses."""
            nonlocal expected
            expected += accepted
            drain = await wait_drained(session, gateway, expected + prober.accepted)
            say(f"  backlog: {drain.describe()}")
            return drain

        async def settled() -> None:
            """Every dose accepted so far counted before the next phase starts, so that no phase measures the
            previous one's backlog; how long that took is printed."""
            drain = await wait_drained(session, gateway, expected + prober.accepted)
            report.settle.append(drain.seconds)
            if drain.seen != drain.expected:
                say(f"  before the next phase: {drain.describe()}")
            await wait_quiet(args.quiet_cores, args.quiet_wait)
            if not args.no_write_back:
                report.written_back.append(await write_back())

        if "single" in phases:
            await settled()
            say("load: single doses through the gateway (lag probes alongside) ...")
            report.single, report.single_cpu = await load(
                LoadSpec(
                    name="single", url=gateway + DOSE_PATH, kind="single", phase=PHASE_SINGLE, tag=f"{tag}-single",
                    matched=tuple(matched), **base,
                ),
                probe_under_load,
            )  # fmt: skip
            say(f"  {report.single.rate:.0f} req/s, {len(report.lag_load.values)} lag probes alongside")
            report.drain_single = await drained(report.single.accepted_total)

        if "lag" in phases:
            await settled()
            say(f"lag: {args.probes} probes on the idle system ...")
            for _ in range(args.probes):
                await prober.probe(report.lag_idle, poll_interval=args.poll_ms / 1000)

        if "batch" in phases:
            await settled()
            say("load: dose batches through the gateway ...")
            report.batch, report.batch_cpu = await load(LoadSpec(name="batch", tag=f"{tag}-batch", **batched))
            say(f"  {report.batch.item_rate:.0f} doses/s")
            report.drain_batch = await drained(report.batch.accepted_total)

        if "later" in phases and report.batch is not None:
            await settled()
            say("load: batches of later doses (their coupons' earlier doses on file) through the gateway ...")
            report.later, report.later_cpu = await load(
                LoadSpec(name="later", tag=f"{tag}-later", coupon_batches=report.batch.requests, **batched)
            )
            say(f"  {report.later.item_rate:.0f} doses/s")
            report.drain_later = await drained(report.later.accepted_total)

        if args.csv_rows and "csv" in phases:
            await settled()
            say(f"CSV import of {args.csv_rows} rows through the gateway ...")
            report.csv = await import_csv(session, gateway, tag, args.csv_rows)
            say(f"  {report.csv.rate:.0f} doses/s {report.csv.error}")
            report.drain_csv = await drained(report.csv.rows_ok)

        if "fixed" in phases and args.fixed_rate is None:
            # The max again, in the state the open-loop run will find: after the phases above the database
            # holds some 300,000 more doses and PostgreSQL is cleaning up after them.
            await settled()
            say("load: the single-dose max again, for the fixed-rate run ...")
            report.max_again, report.max_again_cpu = await load(
                LoadSpec(
                    name="max-again", url=gateway + DOSE_PATH, kind="single", phase=PHASE_MAX_AGAIN,
                    tag=f"{tag}-max-again", **base,
                ),
            )  # fmt: skip
            say(f"  {report.max_again.rate:.0f} req/s")
            await drained(report.max_again.accepted_total)
        rate = fixed_rate(report, args)
        if "fixed" in phases and rate >= 1:
            await settled()
            say(f"load: fixed rate {rate:.0f} doses/s ({args.fixed_share:.0%} of {fixed_max(report, args):.0f}) ...")
            report.fixed, report.fixed_cpu = await load(
                LoadSpec(
                    name="fixed", url=gateway + DOSE_PATH, kind="single", phase=PHASE_FIXED, tag=f"{tag}-fixed",
                    concurrency=max(64, args.concurrency), warmup=args.warmup, duration=args.duration,
                    headers=clinic, rate=rate,
                ),
            )  # fmt: skip
            say(f"  {report.fixed.rate:.0f} req/s")
            report.drain_fixed = await drained(report.fixed.accepted_total)


def statement_profiler(system: System, args: argparse.Namespace, report: Report) -> Callable[..., None]:
    """``--pg-statements``: reset PostgreSQL's statement statistics when a phase starts, keep its top lines when
    it ends (pg_stat_statements, loaded at the server's start; it costs the database a little).
    ``--profile DIR``: py-spy on records' worker processes and stats (and their relays/consumers) meanwhile."""
    running: dict[str, Profiles] = {}

    def profile(phase: str, *, done: bool = False) -> None:
        if args.pg_statements:
            if done:
                report.statements[phase] = top_statements(system.pg)
            else:
                reset_statements(system.pg)
        if not args.profile:
            return
        if done:
            profiles = running.pop(phase)
            profiles.stop()
            report.profiles[phase] = profiles.report(args.profile_lines)
            return
        pids: dict[str, int] = {}
        for name, process in system.stack.processes.items():
            if not name.startswith(("records", "stats")):
                continue
            workers = children_of(process.pid)  # its replicas, when it runs several (devtools.replicas)
            if workers:
                pids |= {f"{name}-{i}": pid for i, pid in enumerate(workers)}
            else:
                pids[name] = process.pid
        running[phase] = Profiles(Path(args.profile) / phase, pids)
        running[phase].start()

    return profile


def server_versions(system: System) -> tuple[str, str]:
    from devtools.harness.kafka import KAFKA_VERSION

    try:
        postgres = system.pg.execute("SHOW server_version").split()[0]
    except Exception:
        postgres = "?"
    return postgres, KAFKA_VERSION


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m devtools.bench", description=__doc__.split("\n")[0] if __doc__ else ""
    )
    parser.add_argument(
        "--duration", type=float, default=float(env("VRS_BENCH_DURATION", "12")), help="measured seconds"
    )
    parser.add_argument(
        "--warmup", type=float, default=float(env("VRS_BENCH_WARMUP", "2")), help="unmeasured seconds first"
    )
    parser.add_argument("--concurrency", type=int, default=int(env("VRS_BENCH_CONCURRENCY", "32")))
    parser.add_argument("--probes", type=int, default=int(env("VRS_BENCH_PROBES", "200")), help="idle lag probes")
    parser.add_argument("--poll-ms", type=float, default=2.0, help="stats polling interval of idle lag probes")
    parser.add_argument("--load-poll-ms", type=float, default=20.0, help="the same under load (it adds load)")
    parser.add_argument("--residents", type=int, default=int(env("VRS_BENCH_RESIDENTS", "500")))
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--csv-rows", type=int, default=int(env("VRS_BENCH_CSV_ROWS", "20000")), help="0: skip")
    parser.add_argument("--fixed-share", type=float, default=0.8, help="the open-loop run's share of the max rate")
    parser.add_argument("--batch-clients", type=int, default=8)
    parser.add_argument("--batch-duration", type=float, default=float(env("VRS_BENCH_BATCH_DURATION", "10")))
    parser.add_argument(
        "--quiet-cores", type=float, default=0.5, help="before each phase, wait until at most this many cores are busy"
    )
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="... but no longer than this many seconds")
    parser.add_argument(
        "--records-workers",
        type=int,
        default=int(env("VRS_BENCH_RECORDS_WORKERS", "1")),
        help="records' processes, each on a socket of its own (production runs 3 replicas, each on cores of its "
        "own; one process uses one core at most). On 2 cores shared with everything else one is faster: its "
        "shared claims, reads and writes carry every request, not half of them",
    )
    parser.add_argument(
        "--worker-processes",
        action="store_true",
        help="relays and consumers as processes of their own, as production runs them (on 2 cores: fresher "
        "statistics, fewer doses/s), not inside their services",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="measure VRS only")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated phases to run, of {','.join(PHASES)} (default: all)"
    )
    parser.add_argument(
        "--fixed-rate",
        type=float,
        default=None,
        help="the max the fixed-rate share is of (default: the single-dose max, measured again just before)",
    )
    parser.add_argument("--profile", default="", help="py-spy records and stats during each load phase into DIR")
    parser.add_argument("--profile-lines", type=int, default=15)
    parser.add_argument(
        "--pg-statements", action="store_true", help="print PostgreSQL's busiest statements of each VRS phase"
    )
    pg_defaults_option(parser)
    parser.add_argument(
        "--no-write-back",
        action="store_true",
        help="do not write the page cache's dirty data to disk before each phase (sync): for comparison",
    )
    return parser.parse_args(argv)


def _terminate(signum: int, _: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the teardown short
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    report = Report()
    try:
        with scratch_directory("vrs-bench-", keep=args.keep, say=say) as tmp, contextlib.ExitStack() as cleanup:
            system = start_system(
                tmp,
                cleanup,
                pg_settings=PG_STATEMENTS if args.pg_statements else None,
                production_pg=not args.pg_defaults,
                replicas={"records": args.records_workers},
                workers=args.worker_processes,
            )
            report.postgres, report.kafka = server_versions(system)
            try:
                asyncio.run(measure(system, args, cleanup, report))
            except BaseException:
                if dead := system.stack.exited():
                    say(f"services that died: {dead}")
                    dump_logs(system.stack.log_dir)
                raise
            print(render(report, args), flush=True)
            say("tearing down ...")
        say("done")
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
