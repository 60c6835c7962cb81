"""The audit trail: an append-only, hash-chained log of every access to personal data.

Each entry stores the hash of the one before it and its own
``entry_hash = sha256(prev_hash || canonical JSON of the entry)`` (hex; the first entry's ``prev_hash`` is
64 zeros). Changing, removing or reordering any entry breaks the chain at that entry, which
:func:`verify_chain` finds. Cutting entries off the *end* leaves a valid, shorter chain: catching that
needs the head (:func:`chain_head`) copied somewhere the gateway cannot write, which is an operations task.

An entry says who (subject, role, organisation), what (method, path template, the path's ids), why
(purpose), when, the result status and the request id. It never holds a request body, and anything that
could be a My Number is masked before it is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.models import AuditEntry
from services.gateway.repository import AuditRepository
from shared import redaction
from shared.db import Database, Databases, UnitOfWork, utcnow

GENESIS_HASH = "0" * 64
DEFAULT_PURPOSE = "administration"
_MAX_PURPOSE = 100
# Fields of an entry that its hash covers, in no particular order (the canonical form sorts them).
_HASHED = (
    "seq",
    "recorded_at",
    "request_id",
    "subject",
    "role",
    "municipality",
    "institution",
    "method",
    "path_template",
    "resource_ids",
    "purpose",
    "status",
)


@dataclass(frozen=True, slots=True)
class AuditFacts:
    """What the request handler knows about one access; :class:`AuditTrail` adds the order and the hashes."""

    request_id: str
    subject: str
    role: str
    municipality: str | None
    institution: str | None
    method: str
    path_template: str
    resource_ids: Mapping[str, str]
    purpose: str
    status: int


def redact_my_numbers(text: str) -> str:
    """Mask every run of twelve digits that passes the My Number check digit (``********9018``); other
    twelve-digit ids stay exact, so the audit trail still names what was read."""
    return redaction.redact_my_numbers(text, only_valid=True)


def purpose_text(stated: object) -> str:
    """The stored "why": free text from the caller, so capped and masked like anything else it sends."""
    if not isinstance(stated, str) or not stated.strip():
        return DEFAULT_PURPOSE
    return redact_my_numbers(stated.strip()[:_MAX_PURPOSE])


def _utc_text(value: datetime) -> str:
    # SQLite hands timestamps back without a zone, PostgreSQL in the session's zone: hash one spelling.
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(fields: Mapping[Any, Any]) -> bytes:
    """The bytes an entry's hash covers: its fields as JSON with sorted keys and no spaces."""
    doc = {name: fields[name] for name in _HASHED}
    doc["recorded_at"] = _utc_text(doc["recorded_at"])
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, fields: Mapping[Any, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(fields)).hexdigest()


class AuditTrail:
    """Appends entries to the one chain of this gateway process.

    Appends are serialised by an ``asyncio.Lock`` held until the entry is committed, so each entry is
    hashed onto the committed one before it; the head is kept in memory to spare a read per append. Two
    gateway processes on one database stay correct but slow — the loser of a race on ``seq`` re-reads the
    head and tries again. Chains partitioned per replica, appended in batches, are a later issue.
    """

    _ATTEMPTS = 5

    def __init__(self, databases: Databases) -> None:
        self._databases = databases
        self._lock = asyncio.Lock()
        self._head: tuple[int, str] | None = None

    async def append(self, facts: AuditFacts) -> AuditEntry:
        async with self._lock:
            for _ in range(self._ATTEMPTS - 1):
                try:
                    return await self._append(facts)
                except IntegrityError:
                    continue  # another writer took this seq
            return await self._append(facts)

    async def _append(self, facts: AuditFacts) -> AuditEntry:
        try:
            # The unit of work commits on leaving the block, still under the lock: the next entry is only
            # hashed onto this one once this one is stored.
            async with UnitOfWork(self._databases) as uow:
                repo = AuditRepository(uow.main())
                if self._head is None:
                    last = await repo.last()
                    self._head = (last.seq, last.entry_hash) if last is not None else (0, GENESIS_HASH)
                seq, prev_hash = self._head
                fields: dict[str, Any] = {
                    "seq": seq + 1,
                    "recorded_at": utcnow(),
                    # Whatever the caller chose (ids, request id, purpose, token subject) is masked.
                    "request_id": redact_my_numbers(facts.request_id),
                    "subject": redact_my_numbers(facts.subject),
                    "role": facts.role,
                    "municipality": facts.municipality,
                    "institution": facts.institution,
                    "method": facts.method,
                    "path_template": facts.path_template,
                    "resource_ids": json.dumps(
                        {k: redact_my_numbers(v) for k, v in facts.resource_ids.items()},
                        sort_keys=True,
                        separators=(",", ":"),
                        ensure_ascii=False,
                    ),
                    "purpose": redact_my_numbers(facts.purpose),
                    "status": facts.status,
                }
                entry = AuditEntry(**fields, prev_hash=prev_hash, entry_hash=chain_hash(prev_hash, fields))
                repo.add(entry)
        except BaseException:
            self._head = None  # unknown whether anything was stored: read the head again next time
            raise
        self._head = (entry.seq, entry.entry_hash)
        return entry


async def chain_head(session: AsyncSession) -> tuple[int, str]:
    """(last seq, its entry_hash): what to copy out of reach to notice a truncated log."""
    last = await AuditRepository(session).last()
    return (last.seq, last.entry_hash) if last is not None else (0, GENESIS_HASH)


async def verify_chain(session: AsyncSession, *, page_size: int = 1000) -> int | None:
    """The first sequence number at which the chain is broken (changed, missing or out of place), or None."""
    repo = AuditRepository(session)
    expected, prev_hash = 1, GENESIS_HASH
    while rows := await repo.page(after_seq=expected - 1, limit=page_size):
        for row in rows:
            if (
                row["seq"] != expected
                or row["prev_hash"] != prev_hash
                or row["entry_hash"] != chain_hash(prev_hash, row)
            ):
                return expected
            prev_hash = row["entry_hash"]
            expected += 1
    return None


async def _verify_configured() -> int:
    from services.gateway.settings import GatewaySettings

    database = Database.connect(GatewaySettings().main_dsn, pool_size=1)
    try:
        async with database.sessionmaker() as session:
            broken = await verify_chain(session)
            seq, entry_hash = await chain_head(session)
    finally:
        await database.engine.dispose()
    if broken is not None:
        print(f"audit chain BROKEN at seq {broken}")
        return 1
    print(f"audit chain intact: {seq} entries, head {entry_hash}")
    return 0


if __name__ == "__main__":
    # ``python -m services.gateway.audit``: verify the configured gateway's audit log (exit 1 if broken).
    raise SystemExit(asyncio.run(_verify_configured()))
