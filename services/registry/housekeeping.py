"""The transfer disclosure log (情報提供等記録) is kept ``VRS_REGISTRY_DISCLOSURE_KEEP_YEARS`` — seven years at
least, as the My Number Act's order requires of it — and then deleted: personal data no longer needed goes.

A row goes once it is older than midnight in Japan starting the same Japanese day that many years before
(:func:`shared.domain.period.kept_since`), so every row is kept its whole term and at most a day more. Every
replica runs a pass every ``VRS_REGISTRY_DISCLOSURE_PURGE_SECONDS``; on PostgreSQL an advisory lock lets one of
them delete at a time, in batches each its own short transaction, found by age through a BRIN index and deleted
by address (:func:`shared.db.delete_older`).
"""

from __future__ import annotations

import logging
from datetime import datetime

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession

from services.registry.repository import DisclosureRepository
from shared.db import Databases, Turns, delete_in_turns, utcnow
from shared.domain.period import kept_since

log = logging.getLogger(__name__)

DISCLOSURES_PURGED = Counter(
    "vrs_registry_disclosures_purged_total",
    "Transfer disclosure log rows deleted once older than VRS_REGISTRY_DISCLOSURE_KEEP_YEARS",
)

BATCH_ROWS = 5000
# Arbitrary but fixed: the advisory lock key of the purge ("VRSDISCL" in ASCII), one replica at a time.
PURGE_LOCK = 0x565253444953434C


async def purge_disclosures(databases: Databases, *, before: datetime, batch_rows: int = BATCH_ROWS) -> Turns:
    """Delete every disclosure logged before ``before`` (unless another replica has the turn)."""

    async def delete(session: AsyncSession, limit: int) -> int:
        count = await DisclosureRepository(session).delete_disclosed_before(before, limit=limit)
        DISCLOSURES_PURGED.inc(count)
        return count

    return await delete_in_turns(databases.main, PURGE_LOCK, delete, batch_rows=batch_rows)


async def purge_pass(databases: Databases, *, keep_years: int) -> None:
    """One pass of the background purge (:func:`shared.periodic.every`)."""
    since = kept_since(utcnow(), keep_years)
    if purged := (await purge_disclosures(databases, before=since)).deleted:
        log.info("transfer disclosures logged before %s deleted: %d", since.isoformat(), purged)
