"""The transfer disclosure log's retention (services/registry/housekeeping.py): rows past their years are
deleted, every younger row is kept, of several replicas one deletes at a time, and registry does it in the
background. On PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select, text

from devtools.harness import free_port
from services.registry.housekeeping import BATCH_ROWS, DISCLOSURES_PURGED, PURGE_LOCK, purge_disclosures
from services.registry.models import TransferDisclosure
from services.registry.settings import RegistrySettings
from shared.db import Databases, Turns, delete_older, utcnow
from shared.domain.period import kept_since
from tests.factories import explained, metric_value, run_sql, vrs_command
from tests.integration.services.registry.registry_support import (
    CHIYODA,
    SAPPORO,
    TREES,
    database_maker,
    migrated_registry,
    serve,
)

YEARS = 7


@pytest.fixture(params=["sqlite", "postgresql"])
async def settings(request: pytest.FixtureRequest, tmp_path: Path) -> RegistrySettings:
    return await migrated_registry(database_maker(request, tmp_path))


@pytest.fixture
async def databases(settings: RegistrySettings) -> AsyncIterator[Databases]:
    dbs = Databases.connect(settings.main_dsn, {}, pool_size=2)
    yield dbs
    await dbs.dispose()


async def log_at(databases: Databases, *moments: datetime) -> None:
    rows = [
        {
            "disclosed_at": at,
            "request_id": f"r{i}",
            "caller_municipality": CHIYODA,
            "caller_resident_id": "C1",
            "source_municipality": SAPPORO,
            "source_resident_id": "S1",
            "legal_basis": "consent",
            "doses": 2,
        }
        for i, at in enumerate(moments)
    ]
    async with databases.main.sessionmaker() as session, session.begin():
        await session.execute(insert(TransferDisclosure), rows)


async def kept(databases: Databases) -> list[str]:
    async with databases.main.sessionmaker() as session:
        stmt = select(TransferDisclosure.request_id).order_by(TransferDisclosure.id)
        return list((await session.execute(stmt)).scalars())


async def test_rows_past_their_years_go_and_every_younger_one_stays(databases: Databases) -> None:
    now = datetime(2026, 11, 28, 1, tzinfo=UTC)  # 10:00 in Japan
    since = kept_since(now, YEARS)  # midnight in Japan starting 28 November 2019
    await log_at(
        databases,
        since - timedelta(days=400),  # r0: long past
        since - timedelta(microseconds=1),  # r1: the last moment of 27 November 2019 in Japan
        since,  # r2: the first moment still kept
        now - timedelta(days=1),  # r3
    )
    before = DISCLOSURES_PURGED._value.get()
    # One row a batch: each batch its own transaction, until one comes back short.
    assert await purge_disclosures(databases, before=since, batch_rows=1) == Turns(deleted=2)
    assert await kept(databases) == ["r2", "r3"]
    assert DISCLOSURES_PURGED._value.get() - before == 2
    assert await purge_disclosures(databases, before=since) == Turns(deleted=0)


async def test_of_two_replicas_one_deletes_at_a_time(make_database: Callable[..., str]) -> None:
    """On PostgreSQL (SQLite is one process: there is no other replica)."""
    databases = Databases.connect(make_database("registry_main", TREES / "main"), {}, pool_size=2)
    await log_at(databases, utcnow() - timedelta(days=3000))
    async with databases.main.sessionmaker() as session, session.begin():
        # Another replica's pass is under way.
        assert await session.scalar(text("SELECT pg_try_advisory_xact_lock(:lock)"), {"lock": PURGE_LOCK})
        assert await purge_disclosures(databases, before=utcnow()) == Turns(deleted=0, taken_elsewhere=True)
    assert await purge_disclosures(databases, before=utcnow()) == Turns(deleted=1)
    await databases.dispose()


async def test_registry_purges_in_the_background(settings: RegistrySettings, databases: Databases) -> None:
    await log_at(databases, kept_since(utcnow(), YEARS) - timedelta(hours=1), utcnow() - timedelta(days=1))
    background = settings.model_copy(update={"disclosure_purge_seconds": 0.05})
    async for _ in serve(background):
        for _ in range(200):
            if await kept(databases) == ["r1"]:
                break
            await asyncio.sleep(0.05)
    assert await kept(databases) == ["r1"]


async def test_vrs_disclosures_purge_once(settings: RegistrySettings, databases: Databases) -> None:
    """The command an operator runs (or a worker of its own, with the API replicas' interval 0)."""
    since = kept_since(utcnow(), YEARS)
    await log_at(databases, since - timedelta(days=1), since + timedelta(days=1))
    env = {"VRS_REGISTRY_MAIN_DSN": settings.main_dsn, "VRS_REGISTRY_SHARD_DSNS": json.dumps(settings.shard_dsns)}
    out = await vrs_command("disclosures", "purge", "--once", env=env)
    assert out.startswith("deleted 1 disclosure log rows older than ")
    assert out.endswith(" (7 years)\n")
    assert await kept(databases) == ["r1"]


async def test_vrs_disclosures_purge_as_a_worker_of_its_own(settings: RegistrySettings, databases: Databases) -> None:
    """Without ``--once``, the process a Deployment of its own would run: a pass every interval, JSON log lines and
    its counter on VRS_REGISTRY_METRICS_PORT like every worker's, and exit 0 on SIGTERM."""
    since = kept_since(utcnow(), YEARS)
    await log_at(databases, since - timedelta(days=1), since + timedelta(days=1))
    port = free_port()
    env = {
        "VRS_REGISTRY_MAIN_DSN": settings.main_dsn,
        "VRS_REGISTRY_SHARD_DSNS": json.dumps(settings.shard_dsns),
        "VRS_REGISTRY_DISCLOSURE_PURGE_SECONDS": "0.1",
        "VRS_REGISTRY_METRICS_PORT": str(port),
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "shared.cli", "disclosures", "purge"),
        env=os.environ | env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    purged = None
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                    if purged := metric_value(text, "vrs_registry_disclosures_purged_total"):
                        break
                await asyncio.sleep(0.1)
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(worker.communicate(), timeout=30)
    log = output.decode()
    assert purged == 1, log
    assert await kept(databases) == ["r1"]
    assert worker.returncode == 0, log
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert {line["service"] for line in lines} == {"registry-disclosure-purge"}, log
    assert any(line["message"].startswith("transfer disclosures logged before ") for line in lines), log


async def test_a_purge_finds_old_rows_through_the_age_index_not_a_scan(make_database: Callable[..., str]) -> None:
    """The statement DisclosureRepository.delete_disclosed_before runs, on a log of many rows: the BRIN index, then
    a delete by address; never the whole log."""
    databases = Databases.connect(make_database("registry_main", TREES / "main"), {}, pool_size=2)
    await run_sql(
        databases.main,
        "INSERT INTO transfer_disclosures (disclosed_at, request_id, caller_municipality, caller_resident_id,"
        " source_municipality, source_resident_id, legal_basis, doses) "
        "SELECT now() - interval '3000 days' + n * interval '1 minute', 'r', :caller, 'C1', :source, 'S1',"
        " 'consent', 2 FROM generate_series(1, 200000) AS n",
        {"caller": CHIYODA, "source": SAPPORO},
    )
    log: Any = TransferDisclosure.__table__
    before = utcnow() - timedelta(days=3000) + timedelta(minutes=10_000)  # the oldest 5 %: a pass's usual share
    stmt = delete_older(log, log.c.disclosed_at, before, limit=BATCH_ROWS, dialect="postgresql")
    plan = await explained(databases.main, "transfer_disclosures", stmt)
    await databases.dispose()
    assert "Bitmap Index Scan on ix_transfer_disclosures_age" in plan, plan
    assert "Tid Scan on transfer_disclosures" in plan and "Seq Scan" not in plan, plan
