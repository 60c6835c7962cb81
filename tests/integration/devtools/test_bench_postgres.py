"""The bench's PostgreSQL: production's memory and WAL parameters (deploy/k8s), and what each phase wrote to the
WAL. With PostgreSQL's default max_wal_size (1GB) the bench's batch phases started a checkpoint every ~26 s,
and after each one the first change to every page wrote the whole page to the WAL again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from devtools.bench.core import WalMeter
from devtools.harness import free_port
from devtools.harness.postgres import PRODUCTION_CLUSTER, SERVER_PARAMETERS, PostgresServer, production_pg_settings


def test_the_bench_takes_the_parameters_production_sets() -> None:
    manifest = yaml.safe_load(PRODUCTION_CLUSTER.read_text())
    parameters = manifest["spec"]["postgresql"]["parameters"]
    assert production_pg_settings() == {name: f"'{parameters[name]}'" for name in SERVER_PARAMETERS}
    # Checkpoints by time at the bench's write rates, not every few hundred MB of WAL.
    assert parameters["max_wal_size"] != "1GB"


def test_postgres_runs_with_production_parameters(pg_bindir: Path, server_dir: Path) -> None:
    server = PostgresServer(server_dir / "data", free_port(), settings=production_pg_settings())
    server.start()
    try:
        shown = {name: server.execute(f"SHOW {name}").strip() for name in SERVER_PARAMETERS}
    finally:
        server.stop()
    assert shown == {name: value.strip("'") for name, value in production_pg_settings().items()}


def test_the_wal_meter_counts_what_a_phase_wrote(pg_server: PostgresServer) -> None:
    pg_server.execute("DROP TABLE IF EXISTS wal_meter_probe; CREATE TABLE wal_meter_probe (n int, pad text)")
    meter = WalMeter(pg_server)
    asyncio.run(meter.start())
    pg_server.execute("INSERT INTO wal_meter_probe SELECT n, repeat('x', 100) FROM generate_series(1, 10000) n")
    pg_server.execute("CHECKPOINT")
    pg_server.execute("UPDATE wal_meter_probe SET n = n + 1")  # each page's first change after the checkpoint
    for n in range(3):  # three commits one after the other: a flush each
        pg_server.execute(f"INSERT INTO wal_meter_probe VALUES ({n}, 'one')")
    asyncio.run(meter.stop())
    pg_server.execute("DROP TABLE wal_meter_probe")
    assert meter.bytes > 10_000 * 100  # at least the rows themselves
    assert meter.full_pages > 0
    assert meter.checkpoints >= 1
    assert meter.flushes >= 5  # the INSERT's commit, the UPDATE's, the three above
    assert meter.line(10_000).startswith("WAL (whole server): ")
