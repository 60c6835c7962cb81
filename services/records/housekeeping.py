"""Idempotency keys expire: a retry is answered as first for ``VRS_RECORDS_IDEMPOTENCY_KEEP_DAYS``, then its key
is deleted — the claim in the main database and the answer in the shard.

Without this both tables grow by every dose ever sent (Japan's busiest day: 1.25 million), and the claims, in the
one main database, with the whole country's. A retry after its key was deleted is a new request: the same dose
again is an exact duplicate of the one on file and is answered ``duplicate`` with the first dose's id, so
nothing is stored or counted twice; only the answer's wording differs from the first.

Every replica runs a pass every ``VRS_RECORDS_KEY_EXPIRY_SECONDS``; on PostgreSQL an advisory lock lets one of them
delete at a time (a replica that finds it taken leaves that database to the other). Rows go in batches, each
its own short transaction, found by age through a BRIN index and deleted by address
(:func:`shared.db.delete_older`). A shard that a shard move is coming from or going to is left alone until the
move is done: the move compares the municipality's rows on both sides.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession

from services.records.repository import KeyExpiryRepository
from shared.db import Database, Databases, Turns, delete_in_turns, utcnow

log = logging.getLogger(__name__)

KEYS_EXPIRED = Counter(
    "vrs_records_idempotency_keys_expired_total",
    "Idempotency keys deleted once older than VRS_RECORDS_IDEMPOTENCY_KEEP_DAYS (database: main for the claims, "
    "else the shard of the answers)",
    ["database"],
)

BATCH_ROWS = 5000
# Arbitrary but fixed: the advisory lock key of the expiry ("VRSKEYEX" in ASCII), one replica at a time.
EXPIRY_LOCK = 0x5652534B45594558


@dataclass
class Expired:
    """What one pass deleted: claims (main database), answers per shard; the shards it left for a move, and the
    databases (``main`` or a shard) where another replica had the turn."""

    claims: int = 0
    keys: dict[str, int] = field(default_factory=dict)
    moving: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.claims + sum(self.keys.values())


async def _expire(
    db: Database,
    label: str,
    rows: Callable[[KeyExpiryRepository, datetime, int], Awaitable[int]],
    before: datetime,
    batch_rows: int,
) -> Turns:
    async def delete(session: AsyncSession, limit: int) -> int:
        count = await rows(KeyExpiryRepository(session), before, limit)
        KEYS_EXPIRED.labels(label).inc(count)
        return count

    return await delete_in_turns(db, EXPIRY_LOCK, delete, batch_rows=batch_rows)


async def expire_keys(databases: Databases, *, before: datetime, batch_rows: int = BATCH_ROWS) -> Expired:
    """One pass: delete every claim and answer created before ``before``."""
    done = Expired()

    def note(label: str, turns: Turns) -> int:
        if turns.taken_elsewhere:
            done.elsewhere.append(label)
        return turns.deleted

    claims = KeyExpiryRepository.delete_claims_before
    done.claims = note("main", await _expire(databases.main, "main", claims, before, batch_rows))
    async with databases.main.sessionmaker() as session:
        moving = await KeyExpiryRepository(session).moving_shards()
    for name, db in databases.shards.items():
        if name in moving:
            done.moving.append(name)
            continue
        answers = KeyExpiryRepository.delete_answers_before
        done.keys[name] = note(name, await _expire(db, name, answers, before, batch_rows))
    return done


async def expire_pass(databases: Databases, *, keep: timedelta) -> None:
    """One pass of the background expiry (:func:`shared.periodic.every`): what is older than ``keep``."""
    done = await expire_keys(databases, before=utcnow() - keep)
    if done.total:
        log.info("idempotency keys older than %d days deleted: %d", keep.days, done.total)
    if done.moving:
        log.info("idempotency keys of shards %s kept until their shard move is done", done.moving)
