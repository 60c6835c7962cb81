"""Rebuilding the aggregates from the topic: ``vrs stats rebuild``.

A consumer of its own name (``<consumer>-rebuild``) replays the topic from offset 0 into shadow tables (the
cells and their rollups) beside the live ones, while the live consumers and the API go on as usual. When the
shadow has caught up with the live consumer's committed offsets, one transaction — holding the live
consumers off — drops the live tables, renames the shadows into their places and hands the rebuild's
processed ids and offsets to the live consumer name. Readers see the old aggregates or the new ones, never a
mix; the live consumers resume on the new tables where the rebuild stopped (what they had read beyond it is
recognised by event id).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import MetaData

from services.stats.consumer import StatsConsumer
from services.stats.models import Aggregates, consumer_bookkeeping
from services.stats.repository import RebuildRepository
from services.stats.settings import StatsSettings
from shared.consumer import Bookkeeping
from shared.db import Database, utcnow

log = logging.getLogger(__name__)

SHADOW_SUFFIX = "_rebuild"  # dose_counts_rebuild, dose_totals_by_date_rebuild, …


@dataclass(frozen=True)
class Rebuilt:
    events_applied: int
    offsets: dict[int, int]
    attempts: int


class RebuildFailed(RuntimeError):
    pass


async def rebuild(
    database: Database, settings: StatsSettings, *, idle: float = 1.0, attempts: int = 30, max_records: int = 5000
) -> Rebuilt:
    live = settings.consumer_name
    name = f"{live}-rebuild"[:64]
    shadow = Aggregates.named(MetaData(), SHADOW_SUFFIX)
    topic = settings.bus.topic
    async with database.sessionmaker() as session, session.begin():
        await RebuildRepository(session).prepare(shadow, name)
    consumer = StatsConsumer(
        database, bus=settings.bus, name=name, max_records=max_records, poll_timeout=idle, aggregates=shadow
    )
    applied = 0
    try:
        for attempt in range(1, attempts + 1):
            applied += await consumer.drain(idle=idle)
            async with database.sessionmaker() as session, session.begin():
                rebuilds = RebuildRepository(session)
                await rebuilds.lock_writers()
                consumers = Bookkeeping(session, consumer_bookkeeping)
                ahead = await consumers.offsets(live, topic)
                mine = await consumers.offsets(name, topic)
                behind = {p: o for p, o in ahead.items() if mine.get(p, 0) < o}
                if not behind:
                    await rebuilds.swap(shadow, live=live, rebuilt=name, topic=topic, now=utcnow())
                    log.info("stats rebuilt from %d events, swapped in at offsets %s", applied, mine)
                    return Rebuilt(events_applied=applied, offsets=mine, attempts=attempt)
            log.info("rebuild behind the live consumer on partitions %s; catching up", sorted(behind))
    finally:
        await consumer.stop()
    raise RebuildFailed(f"the rebuild did not catch up with the live consumer in {attempts} attempts")
