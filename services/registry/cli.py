"""registry's ``vrs`` subcommands: ``vrs residents import``, ``vrs keys``, ``vrs certificates sweep``,
``vrs disclosures purge`` and the ``relay`` worker."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from services.registry import certificates, housekeeping, importer, service
from services.registry.crypto import MyNumberVault
from services.registry.models import outbox, shard_assignments, shard_moves
from services.registry.repository import MOVABLE_TABLES, ImportRepository, ResidentRepository
from services.registry.settings import RegistrySettings
from shared.db import Databases, utcnow
from shared.domain.period import kept_since
from shared.errors import ServiceUnavailable
from shared.internal import InternalClient
from shared.observability import setup_worker
from shared.outbox import run_relay_process
from shared.periodic import add_pass_command, work_until_stopped
from shared.shardmove import MoveSpec


def relay() -> None:
    """``vrs relay registry``: publish registry's outbox to ``coupon-events``."""
    settings = RegistrySettings()
    setup_worker(service="registry-relay", log_level=settings.log_level, metrics_port=settings.metrics_port)
    asyncio.run(run_relay_process(settings, outbox, topic=settings.bus.coupon_topic))


def register(subparsers: Any) -> None:
    residents = subparsers.add_parser("residents", help="municipal residents (registry)")
    sub = residents.add_subparsers(required=True, metavar="ACTION")
    imp = sub.add_parser("import", help="import a resident CSV (住基 export) through the gateway, with progress")
    imp.add_argument("file", type=Path)
    imp.add_argument("--municipality", required=True, help="6-digit municipality code")
    imp.add_argument("--gateway", default=os.environ.get("VRS_GATEWAY", "http://127.0.0.1:8000"))
    imp.add_argument("--token", default=os.environ.get("VRS_TOKEN"), help="bearer token (default: $VRS_TOKEN)")
    imp.add_argument("--poll", type=float, default=0.5, help="seconds between status checks")
    imp.set_defaults(func=_import)

    keys = subparsers.add_parser("keys", help="My Number encryption keys (registry)")
    keys_sub = keys.add_subparsers(required=True, metavar="ACTION")
    rotate = keys_sub.add_parser(
        "rotate",
        help="re-seal every My Number and stored import upload under the active key, in batches, while serving",
    )
    rotate.add_argument("--batch-size", type=int, default=500)
    rotate.set_defaults(func=lambda args: asyncio.run(_rotate(args.batch_size)))
    status = keys_sub.add_parser(
        "status", help="how many My Numbers each key id seals, per shard, and stored import upload pieces"
    )
    status.set_defaults(func=lambda _: asyncio.run(_key_status()))

    certs = subparsers.add_parser("certificates", help="issued certificates and their revocation (registry)")
    certs_sub = certs.add_subparsers(required=True, metavar="ACTION")
    add_pass_command(
        certs_sub,
        "sweep",
        "revoke the cards showing a dose records has since voided or corrected (the API's sweep)",
        _sweep,
    )

    disclosures = subparsers.add_parser("disclosures", help="the transfer disclosure log, 情報提供等記録 (registry)")
    disclosures_sub = disclosures.add_subparsers(required=True, metavar="ACTION")
    add_pass_command(
        disclosures_sub,
        "purge",
        "delete the rows older than VRS_REGISTRY_DISCLOSURE_KEEP_YEARS (the API's purge)",
        _purge,
    )


async def _rotate(batch_size: int) -> int:
    settings = RegistrySettings()
    vault = MyNumberVault(settings)
    databases = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=2)
    try:
        # Uploads of imports not yet finished hold My Numbers too (1 MiB pieces: a few per transaction).
        total = 0
        while True:
            async with databases.main.sessionmaker() as session, session.begin():
                done = await importer.reseal_chunks_batch(session, vault, limit=8)
            if not done:
                break
            total += done
        print(f"import uploads: {total:,} pieces re-sealed under {vault.active_key} — done", file=sys.stderr)
        for name, db in sorted(databases.shards.items()):
            total = 0
            while True:
                async with db.sessionmaker() as session, session.begin():
                    done = await service.rotate_keys_batch(session, vault, limit=batch_size)
                if not done:
                    break
                total += done
                print(f"\rshard {name}: {total:,} re-sealed under {vault.active_key}", end="", file=sys.stderr)
            print(f"\rshard {name}: {total:,} re-sealed under {vault.active_key} — done", file=sys.stderr)
    finally:
        await databases.dispose()
    return 0


async def _sweep(*, once: bool) -> int:
    """What the registry API runs every ``VRS_REGISTRY_CERTIFICATE_SWEEP_SECONDS``, on demand or as a worker
    of its own (then set the API's interval to 0)."""
    settings = RegistrySettings()
    databases = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=2)
    records = InternalClient(settings.records_url)
    issuer = certificates.Issuer.from_settings(settings)
    batch = settings.certificate_sweep_batch
    try:
        if not once:
            job = functools.partial(certificates.sweep_pass, databases, records, issuer, batch_size=batch)
            interval = settings.certificate_sweep_seconds or 30.0
            await work_until_stopped(
                settings, "registry-certificate-sweep", interval, job, name="certificate sweep", first_after=0
            )
            return 0
        try:
            done = await certificates.sweep(databases, records, issuer, batch_size=batch)
        except ServiceUnavailable as exc:
            print(f"records did not answer: {exc}", file=sys.stderr)
            return 1
        print("another replica is sweeping" if done.skipped else f"checked {done.checked}, revoked {done.revoked}")
    finally:
        await records.close()
        await databases.dispose()
    return 0


async def _purge(*, once: bool) -> int:
    """What the registry API runs every ``VRS_REGISTRY_DISCLOSURE_PURGE_SECONDS``, on demand or as a worker of its
    own (then set the API's interval to 0)."""
    settings = RegistrySettings()
    databases = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=2)
    years = settings.disclosure_keep_years
    try:
        if not once:
            job = functools.partial(housekeeping.purge_pass, databases, keep_years=years)
            interval = settings.disclosure_purge_seconds or 3600.0
            await work_until_stopped(
                settings, "registry-disclosure-purge", interval, job, name="transfer disclosure purge"
            )
            return 0
        since = kept_since(utcnow(), years)
        purged = await housekeeping.purge_disclosures(databases, before=since)
        print(f"deleted {purged.deleted} disclosure log rows older than {since.isoformat()} ({years} years)")
        if purged.taken_elsewhere:
            print("another replica is purging: left to it")
    finally:
        await databases.dispose()
    return 0


async def _key_status() -> int:
    settings = RegistrySettings()
    databases = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=2)
    try:
        async with databases.main.sessionmaker() as session:
            pieces = await ImportRepository(session).chunk_key_counts()
        print(
            "import uploads", " ".join(f"{kid or 'unsealed'}={n}" for kid, n in sorted(pieces.items(), key=str)) or "-"
        )
        for name, db in sorted(databases.shards.items()):
            async with db.sessionmaker() as session:
                counts = await ResidentRepository(session).key_counts()
            print(name, " ".join(f"{kid}={n}" for kid, n in sorted(counts.items())) or "-")
    finally:
        await databases.dispose()
    return 0


def _chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as file:
        while piece := file.read(size):
            yield piece


def _bar(done: int, total: int, status: dict[str, Any], width: int = 30) -> str:
    share = done / total if total else 1.0
    filled = int(share * width)
    return (
        f"\r[{'#' * filled}{'.' * (width - filled)}] {share:6.1%}  "
        f"rows {status.get('rows_total', 0):,} ok {status.get('rows_ok', 0):,} failed {status.get('rows_failed', 0):,}"
    )


def _import(args: argparse.Namespace) -> int:
    if not args.token:
        print("a token is needed: --token or $VRS_TOKEN (e.g. from `vrs token --role municipality`)", file=sys.stderr)
        return 2
    base = f"{args.gateway.rstrip('/')}/api/v1/municipalities/{args.municipality}/resident-imports"
    headers = {"Authorization": f"Bearer {args.token}"}
    with httpx.Client(timeout=httpx.Timeout(60.0, read=600.0)) as client:
        r = client.post(base, content=_chunks(args.file), headers=headers | {"Content-Type": "text/csv"})
        if r.status_code != 202:
            print(f"upload refused: {r.status_code} {r.text}", file=sys.stderr)
            return 1
        import_id = r.json()["import_id"]
        print(f"import {import_id}", file=sys.stderr)
        started = time.monotonic()
        while True:
            s = client.get(f"{base}/{import_id}", headers=headers, params={"errors_limit": 100_000})
            if s.status_code != 200:
                print(f"\nstatus check failed: {s.status_code} {s.text}", file=sys.stderr)
                return 1
            status = s.json()
            print(_bar(status["bytes_done"], status["bytes_total"], status), end="", file=sys.stderr, flush=True)
            if status["status"] != "running":
                break
            time.sleep(args.poll)
    elapsed = time.monotonic() - started
    print(f"\n{status['status']} in {elapsed:.1f}s", file=sys.stderr)
    for e in status["errors"]:
        print(f"row {e['row']}: {e['field']}: {e['message']}")
    if status["errors_more"]:
        print("(more errors: page with ?errors_after_row=)", file=sys.stderr)
    return 0 if not status["rows_failed"] and not status["errors"] else 1


def shard_mover() -> MoveSpec:
    """What ``vrs shards move`` moves of registry (fenced first, released last: its events feed records)."""
    settings = RegistrySettings()
    databases = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=2)
    return MoveSpec("registry", databases, MOVABLE_TABLES, shard_moves, shard_assignments)
