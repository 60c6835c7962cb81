"""``vrs audit verify``: check every audit chain of the configured gateway database against its anchor."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any


async def verify_configured() -> int:
    from services.gateway.audit import FileAnchorStore, verify_trail
    from services.gateway.settings import GatewaySettings
    from shared.db import Database

    settings = GatewaySettings()
    database = Database.connect(settings.main_dsn, pool_size=1)
    try:
        async with database.sessionmaker() as session:
            problems, checked = await verify_trail(
                session, settings.audit_key.encode(), FileAnchorStore(settings.audit_anchor_dir)
            )
    finally:
        await database.engine.dispose()
    for problem in problems:
        print(f"audit trail BROKEN: {problem}")
    if problems:
        return 1
    print(f"audit trail intact: {checked} entries")
    return 0


def _verify(_: argparse.Namespace) -> int:
    return asyncio.run(verify_configured())


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the gateway's audit trail")
    commands = audit.add_subparsers(required=True, metavar="ACTION")
    verify = commands.add_parser(
        "verify", help="find any changed, deleted or truncated entry (exit 1); uses the VRS_GATEWAY_ settings"
    )
    verify.set_defaults(func=_verify)
