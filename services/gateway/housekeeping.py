"""The audit trail is kept ``VRS_GATEWAY_AUDIT_KEEP_YEARS`` — seven years at least, as long as registry's
transfer disclosure log, whose rows name the audit entry of their request — and then cut from the front of each
chain: an access log of personal data is personal data too, and no longer needed after its years.

An entry goes once it is older than midnight in Japan starting the same Japanese day that many years before
(:func:`shared.domain.period.kept_since`). A chain is cut, never holed: entries go from its first on, up to its last
entry recorded before that moment, and ``audit_cuts`` records the last one deleted and its MAC, keyed with the audit
key (:func:`services.gateway.audit.cut_mac`), so that ``vrs audit verify`` checks the chain from there. (Entries of
one chain are recorded in order; a clock stepped back by a few seconds may cut an entry those seconds early.)

Every replica runs a pass every ``VRS_GATEWAY_AUDIT_PURGE_SECONDS``; on PostgreSQL an advisory lock lets one of them
cut at a time, in batches of a range of the primary key, each its own short transaction with its cut. A chain whose
cut does not verify is left as it is, for ``vrs audit verify`` to show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.audit import cut_is_genuine, cut_mac
from services.gateway.repository import AuditRepository
from shared.db import Databases, delete_in_turns, utcnow
from shared.domain.period import kept_since

log = logging.getLogger(__name__)

AUDIT_ENTRIES_PURGED = Counter(
    "vrs_gateway_audit_entries_purged_total",
    "Audit entries deleted from the front of their chain once older than VRS_GATEWAY_AUDIT_KEEP_YEARS",
)

BATCH_ROWS = 5000
# Arbitrary but fixed: the advisory lock key of the purge ("VRSAUDIT" in ASCII), one replica at a time.
PURGE_LOCK = 0x5652534155444954


@dataclass
class Purged:
    """What one pass did: entries deleted, the chains it cut, whether another replica had the turn, and the chains
    it left alone because their cut does not verify."""

    entries: int = 0
    chains: list[str] = field(default_factory=list)
    elsewhere: bool = False
    refused: list[str] = field(default_factory=list)


async def purge_audit(databases: Databases, key: bytes, *, before: datetime, batch_rows: int = BATCH_ROWS) -> Purged:
    """Cut every chain after its last entry recorded before ``before``."""
    done = Purged()
    async with databases.main.sessionmaker() as session:
        chains = await AuditRepository(session).instances()
    for instance in chains:

        async def cut(session: AsyncSession, limit: int, instance: str = instance) -> int:
            repo = AuditRepository(session)
            previous = await repo.cut(instance)
            if previous is not None and not cut_is_genuine(key, previous):
                done.refused.append(instance)
                return 0
            after = 0 if previous is None else int(previous["seq"])
            last = await repo.last_recorded_before(instance, after_seq=after, limit=limit, before=before)
            if last is None:
                return 0
            row = {"instance": instance, "seq": last[0], "mac": last[1], "kept_since": before, "cut_at": utcnow()}
            count = await repo.cut_through(row | {"cut_mac": cut_mac(key, row)}, after_seq=after)
            AUDIT_ENTRIES_PURGED.inc(count)
            return count

        turns = await delete_in_turns(databases.main, PURGE_LOCK, cut, batch_rows=batch_rows)
        if turns.taken_elsewhere:
            done.elsewhere = True
            break
        if turns.deleted:
            done.entries += turns.deleted
            done.chains.append(instance)
    for instance in done.refused:
        log.error("audit chain %s: its cut does not verify; left as it is (run `vrs audit verify`)", instance)
    return done


async def purge_pass(databases: Databases, key: bytes, *, keep_years: int) -> None:
    """One pass of the background purge (:func:`shared.periodic.every`)."""
    since = kept_since(utcnow(), keep_years)
    done = await purge_audit(databases, key, before=since)
    if done.entries:
        log.info(
            "audit entries recorded before %s deleted: %d, from %d chains",
            since.isoformat(),
            done.entries,
            len(done.chains),
        )
