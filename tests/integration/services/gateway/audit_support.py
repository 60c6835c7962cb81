"""The audit chains as the tests write and check them: entries' facts, a running writer, what verification finds."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import Table, select

from services.gateway.audit import AuditFacts, AuditTrail, FileAnchorStore, LegalBasis, verify_trail
from services.gateway.models import AuditEntry
from shared.db import Database, Databases

CHIYODA, SAPPORO, CLINIC = "131016", "011002", "1312345678"
M = "/api/v1/municipalities"
KEY = b"test-audit-key-of-at-least-32-bytes!"
TABLE: Table = AuditEntry.__table__  # type: ignore[assignment]


async def rows(db: Database, instance: str) -> list[AuditEntry]:
    async with db.sessionmaker() as session:
        stmt = select(AuditEntry).where(AuditEntry.instance == instance).order_by(AuditEntry.seq)
        return list((await session.execute(stmt)).scalars())


def facts(n: int, **changes: Any) -> AuditFacts:
    base: dict[str, Any] = {
        "request_id": f"req-{n}",
        "principal": CHIYODA,
        "role": "municipality",
        "caller_municipality": CHIYODA,
        "institution": None,
        "municipality": CHIYODA,
        "action": f"GET {M}/{{code}}/residents/{{resident_id}}",
        "resource": f"{M}/{CHIYODA}/residents/r-{n}",
        "legal_basis": LegalBasis.ADMINISTRATION,
        "outcome": 200,
    }
    return AuditFacts(**{**base, **changes})


@contextlib.asynccontextmanager
async def trail(databases: Databases, anchors: FileAnchorStore, instance: str = "gw-a") -> AsyncIterator[AuditTrail]:
    writer = AuditTrail(databases, key=KEY, instance=instance, anchors=anchors)
    await writer.start()
    try:
        yield writer
    finally:
        await writer.stop()


async def problems_of(databases: Databases, anchors: FileAnchorStore, key: bytes = KEY) -> list[str]:
    async with databases.main.sessionmaker() as session:
        found, _ = await verify_trail(session, key, anchors)
    return [str(p) for p in found]


async def execute(databases: Databases, statement: Any) -> None:
    async with databases.main.sessionmaker() as session, session.begin():
        await session.execute(statement)
