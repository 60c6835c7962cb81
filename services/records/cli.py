"""records' ``vrs`` commands: the worker processes, ``vrs doses import`` for a site's dose CSV, and ``vrs doses
expire-keys``."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from services.records import housekeeping, repository
from services.records.consumer import coupon_consumers, wait_caught_up
from services.records.models import outbox, shard_assignments, shard_moves
from services.records.repository import MOVABLE_TABLES
from services.records.settings import RecordsSettings
from shared.bus.offsets import report_lag_forever
from shared.consumer import stored_positions
from shared.db import utcnow
from shared.observability import setup_worker, stop_on_signals
from shared.outbox import run_relay_process
from shared.periodic import add_pass_command, cancel_and_wait, work_until_stopped
from shared.shardmove import MoveSpec


def relay() -> None:
    """``vrs relay records``: publish records' outbox to ``dose-events``."""
    settings = RecordsSettings()
    setup_worker(service="records-relay", log_level=settings.log_level, metrics_port=settings.metrics_port)
    asyncio.run(run_relay_process(settings, outbox, topic=settings.bus.topic))


async def _consume(settings: RecordsSettings) -> None:
    databases = repository.connect(settings.main_dsn, settings.shard_dsns, pool_size=4)
    stop = stop_on_signals()
    consumers = coupon_consumers(settings, databases)
    # One consumer per shard, each with its own positions: lag is reported per shard.
    lag = [
        asyncio.create_task(report_lag_forever(settings.bus, c.topic, f"{c.name}-{shard}", stored_positions(c)))
        for shard, c in zip(databases.shards, consumers, strict=True)
    ]
    try:
        for consumer in consumers:
            consumer.start()
        await stop.wait()
    finally:
        await cancel_and_wait(*lag)
        for consumer in consumers:
            await consumer.stop()
        await databases.dispose()


def consume() -> None:
    """``vrs consume records``: apply ``coupon-events`` to the coupon projection of every shard."""
    settings = RecordsSettings()
    setup_worker(service="records-coupon-consumer", log_level=settings.log_level, metrics_port=settings.metrics_port)
    asyncio.run(_consume(settings))


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else 0
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def _import_file(args: argparse.Namespace) -> int:
    """Upload the file, then follow the import until it is done, drawing a progress bar on stderr."""
    token = args.token or os.environ.get("VRS_TOKEN")
    if not token:
        print("vrs doses import: give --token or set VRS_TOKEN (role institution or municipality)", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=args.gateway, headers=headers, timeout=60) as client:
        response = client.post(
            "/api/v1/dose-imports", content=Path(args.file).read_bytes(), headers={"Content-Type": "text/csv"}
        )
        if response.status_code != 202:
            print(f"vrs doses import: {response.status_code} {response.text}", file=sys.stderr)
            return 1
        import_id = response.json()["import_id"]
        print(f"import {import_id}", file=sys.stderr)
        while True:
            state: dict[str, Any] = client.get(f"/api/v1/dose-imports/{import_id}").raise_for_status().json()
            done = state["rows_ok"] + state["rows_failed"]
            print(f"\r{_bar(done, state['rows_total'])} {state['status']}", end="", file=sys.stderr, flush=True)
            if state["status"] == "done":
                break
            time.sleep(args.poll)
    print(file=sys.stderr)
    for error in state["errors"]:
        print(f"row {error['row']}: {error['field']}: {error['message']}")
    print(f"{state['rows_ok']} rows recorded, {state['rows_failed']} failed", file=sys.stderr)
    return 0 if state["status"] == "done" and not state["rows_failed"] else 1


def register(sub: Any) -> None:
    doses = sub.add_parser("doses", help="dose records")
    commands = doses.add_subparsers(required=True, metavar="COMMAND")
    upload = commands.add_parser("import", help="upload a dose CSV and follow its import (progress bar on stderr)")
    upload.add_argument("file", help="CSV: client_id,coupon,dose_number,vaccinated_on,vaccine,lot_number,...")
    upload.add_argument("--gateway", default=os.environ.get("VRS_GATEWAY", "http://127.0.0.1:8000"))
    upload.add_argument("--token", help="a bearer token (default: $VRS_TOKEN)")
    upload.add_argument("--poll", type=float, default=0.5, help="seconds between status checks")
    upload.set_defaults(func=_import_file)
    add_pass_command(
        commands,
        "expire-keys",
        "delete idempotency keys older than VRS_RECORDS_IDEMPOTENCY_KEEP_DAYS (what each API replica does)",
        _expire_keys,
    )


async def _expire_keys(*, once: bool) -> int:
    """What each records replica runs every ``VRS_RECORDS_KEY_EXPIRY_SECONDS``, on demand or as a worker of its own
    (then set the API's interval to 0)."""
    settings = RecordsSettings()
    databases = repository.connect(settings.main_dsn, settings.shard_dsns, pool_size=2)
    keep = timedelta(days=settings.idempotency_keep_days)
    try:
        if not once:
            job = functools.partial(housekeeping.expire_pass, databases, keep=keep)
            interval = settings.key_expiry_seconds or 600.0
            await work_until_stopped(settings, "records-key-expiry", interval, job, name="idempotency key expiry")
            return 0
        done = await housekeeping.expire_keys(databases, before=utcnow() - keep)
        shards = ", ".join(f"{n} in {shard}" for shard, n in done.keys.items())
        answers = sum(done.keys.values())
        print(f"deleted {done.claims} claims and {answers} answers ({shards}) older than {keep.days} days")
        if done.moving:
            print(f"kept the answers of shards {', '.join(done.moving)} until their shard move is done")
        if done.elsewhere:
            print(f"another replica is deleting in {', '.join(done.elsewhere)}: left to it")
    finally:
        await databases.dispose()
    return 0


def shard_mover() -> MoveSpec:
    """What ``vrs shards move`` moves of records; before its fence, its coupon consumers catch up."""
    settings = RecordsSettings()
    databases = repository.connect(settings.main_dsn, settings.shard_dsns, pool_size=2)
    return MoveSpec(
        "records",
        databases,
        MOVABLE_TABLES,
        shard_moves,
        shard_assignments,
        before_fence=lambda: wait_caught_up(settings, databases),
    )
