"""``vrs audit verify``: check every audit chain of the configured gateway database against its anchor; ``vrs audit
purge``: cut what is past its years."""

from __future__ import annotations

import argparse
import asyncio
import functools
from typing import Any

from services.gateway import housekeeping
from services.gateway.audit import FileAnchorStore, utc_text, verify_trail
from services.gateway.repository import AuditRepository
from services.gateway.settings import GatewaySettings
from shared.db import Database, Databases, utcnow
from shared.domain.period import kept_since
from shared.periodic import add_pass_command, work_until_stopped


async def verify_configured() -> int:
    settings = GatewaySettings()
    database = Database.connect(settings.main_dsn, pool_size=1)
    try:
        async with database.sessionmaker() as session:
            problems, checked = await verify_trail(
                session, settings.audit_key.encode(), FileAnchorStore(settings.audit_anchor_dir)
            )
            cuts = await AuditRepository(session).cuts()
    finally:
        await database.engine.dispose()
    for problem in problems:
        print(f"audit trail BROKEN: {problem}")
    if problems:
        return 1
    print(f"audit trail intact: {checked} entries")
    if cuts:
        latest = utc_text(max(cut["kept_since"] for cut in cuts))
        print(f"{len(cuts)} chains checked from where retention cut them (the latest cut: entries before {latest})")
    return 0


def _verify(_: argparse.Namespace) -> int:
    return asyncio.run(verify_configured())


async def _purge(*, once: bool) -> int:
    """What each gateway replica runs every ``VRS_GATEWAY_AUDIT_PURGE_SECONDS``, on demand or as a worker of its own
    (then set the API's interval to 0)."""
    settings = GatewaySettings()
    databases = Databases.connect(settings.main_dsn, pool_size=2)
    key, years = settings.audit_key.encode(), settings.audit_keep_years
    try:
        if not once:
            job = functools.partial(housekeeping.purge_pass, databases, key, keep_years=years)
            interval = settings.audit_purge_seconds or 3600.0
            await work_until_stopped(settings, "gateway-audit-purge", interval, job, name="audit trail purge")
            return 0
        since = kept_since(utcnow(), years)
        done = await housekeeping.purge_audit(databases, key, before=since)
        print(f"deleted {done.entries} audit entries older than {since.isoformat()} ({years} years)", end="")
        print(f" from {len(done.chains)} chains" if done.chains else "")
        if done.elsewhere:
            print("another replica is purging: left to it")
        if done.refused:
            print(f"left alone: the cut of chains {', '.join(done.refused)} does not verify (run `vrs audit verify`)")
            return 1
    finally:
        await databases.dispose()
    return 0


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the gateway's audit trail")
    commands = audit.add_subparsers(required=True, metavar="ACTION")
    verify = commands.add_parser(
        "verify", help="find any changed, deleted or truncated entry (exit 1); uses the VRS_GATEWAY_ settings"
    )
    verify.set_defaults(func=_verify)
    add_pass_command(
        commands,
        "purge",
        "cut the entries older than VRS_GATEWAY_AUDIT_KEEP_YEARS from their chains (the API's purge)",
        _purge,
    )
