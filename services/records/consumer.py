"""records' consumer of ``coupon-events``: one per shard, each applying the events of its own municipalities.

Each shard keeps its own bookkeeping (processed event ids and offsets) beside its projection and doses, so
an event's effect — the projection row, the doses it matches or moves, their dose events in the outbox —
and the consumer's new position commit in one transaction of that shard. Every shard's consumer reads
every partition and skips the municipalities another shard holds; coupon events are few (registry
changes), so reading them twice costs little and keeps each shard exactly-once on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from services.records import service
from services.records.models import consumer_bookkeeping
from services.records.settings import RecordsSettings
from shared.bus import Message, make_source
from shared.consumer import Bookkeeping, Handler, IdempotentConsumer, Taken
from shared.db import Databases, utcnow
from shared.events import CouponEvent, coupon_events_from_bytes
from shared.outbox import OutboxNotifier, OutboxRelay
from shared.shardmove import ShardMoveError

log = logging.getLogger(__name__)


# The fewest doses a coupon-event transaction is bounded to, whatever the estimate: a slow moment (the
# transaction waited for a dose write's coupon lock) must not shrink the catch-up to a crawl.
MIN_BATCH_DOSES = 100

# What an operator watches when dose writes wait on coupon locks (make soak logs every wait of 1 s or more).
COUPON_APPLY_SECONDS = Histogram(
    "vrs_records_coupon_apply_seconds",
    "A coupon-event transaction's apply, by shard: the doses it moves stay locked at least this long",
    ["shard"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
COUPON_DOSES_MOVED = Counter(
    "vrs_records_coupon_doses_moved", "Doses that coupon events matched, moved or sent to review, by shard", ["shard"]
)
COUPON_DOSE_BOUND = Gauge(
    "vrs_records_coupon_batch_bound_doses",
    "The most doses the shard's next coupon-event transaction may lock (see DoseBudget)",
    ["shard"],
)


@dataclass
class DoseBudget:
    """How many doses one coupon-event transaction may lock: as many as the last transactions moved in
    ``seconds`` (each dose moved is locked to the commit, and a municipality correcting one waits that long), at
    most ``max_doses``. The same bound in doses is a wait of 0.4 s on one host and 1 s on a host 2.5 times
    slower (make soak); the cost a dose is measured as the consumer goes."""

    max_doses: int
    seconds: float
    per_dose: float | None = None  # seconds a locked dose has cost of its transaction, smoothed

    def bound(self) -> int:
        if self.per_dose is None:
            # Nothing measured yet (a consumer just started, say after a crash, with a backlog waiting): a
            # quarter of the count, and more once the first transaction has shown what a dose costs.
            return min(self.max_doses, max(MIN_BATCH_DOSES, self.max_doses // 4))
        return min(self.max_doses, max(MIN_BATCH_DOSES, int(self.seconds / self.per_dose)))

    def observe(self, doses: int, seconds: float) -> None:
        """One transaction's apply: ``doses`` locked in ``seconds`` (its fixed cost counted in, which errs toward
        shorter transactions)."""
        if doses < MIN_BATCH_DOSES // 2:  # a handful of doses says more about the transaction than about them
            return
        sample = seconds / doses
        self.per_dose = sample if self.per_dose is None else 0.7 * self.per_dose + 0.3 * sample


def coupon_event_handler(databases: Databases, shard: str, *, name: str, budget: DoseBudget) -> Handler:
    """Applies a batch's events of this shard's municipalities: only as many messages as hold
    :data:`service.MAX_EVENTS` events and lock at most the doses ``budget`` allows (the rest goes to the next
    transactions, see :class:`shared.consumer.Taken` and :func:`service.apply_coupon_messages`)."""

    apply_seconds = COUPON_APPLY_SECONDS.labels(shard)
    doses_moved = COUPON_DOSES_MOVED.labels(shard)
    dose_bound = COUPON_DOSE_BOUND.labels(shard)
    dose_bound.set(budget.bound())

    async def handle(session: AsyncSession, messages: Sequence[Message]) -> int | Taken:
        decoded: list[list[CouponEvent]] = []
        events = 0
        for message in messages:
            try:
                read = coupon_events_from_bytes(message.value)
            except ValidationError:
                # Never blocks the partition: a message no version of us can read is logged and passed.
                log.error("undecodable coupon event at partition %s offset %s", message.partition, message.offset)
                read = []
            if decoded and events + len(read) > service.MAX_EVENTS:
                # Bounded: the rest is for the next transactions, and decoded then (decoding a bulk import's
                # backlog again at every step made its catch-up twice as slow).
                break
            decoded.append(read)
            events += len(read)
        # The map as it is now, not a cached copy: right after a shard move (shared/shardmove.py) the new shard
        # must take the municipality's next event, which cannot have been published before the move ended.
        shards = await databases.current_shards(e.municipality for events in decoded for e in events)
        mine = [[e for e in events if shards[e.municipality] == shard] for events in decoded]
        # Repeats change nothing (an event no newer than the projection is skipped), so the events are applied
        # first and the ids of those taken claimed after.
        started = time.perf_counter()
        changed, taken, doses = await service.apply_coupon_messages(session, mine, max_doses=budget.bound())
        elapsed = time.perf_counter() - started
        budget.observe(doses, elapsed)
        apply_seconds.observe(elapsed)
        doses_moved.inc(doses)
        dose_bound.set(budget.bound())
        ids = [e.event_id for events in mine[:taken] for e in events]
        await Bookkeeping(session, consumer_bookkeeping).claim(name, ids, at=utcnow())
        return changed if taken == len(messages) else Taken(changed, taken)

    return handle


def coupon_consumers(
    settings: RecordsSettings, databases: Databases, *, relay: OutboxRelay | OutboxNotifier | None = None
) -> list[IdempotentConsumer]:
    """One consumer per shard; ``relay`` (if any) is woken when a batch moved doses."""
    topic = settings.bus.coupon_topic
    consumers = []
    for shard, database in databases.shards.items():
        consumers.append(
            IdempotentConsumer(
                database,
                consumer_bookkeeping,
                name=settings.consumer_name,
                topic=topic,
                source_factory=lambda shard=shard: make_source(  # type: ignore[misc]
                    settings.bus, consumer=f"{settings.consumer_name}-{shard}", topic=topic
                ),
                handler=coupon_event_handler(
                    databases,
                    shard,
                    name=settings.consumer_name,
                    budget=DoseBudget(settings.coupon_batch_max_doses, settings.coupon_batch_max_seconds),
                ),
                max_records=settings.poll_max_records,
                poll_timeout=settings.poll_timeout_seconds,
                on_commit=None if relay is None else (lambda _n, shard=shard: relay.wake(shard)),  # type: ignore[misc]
            )
        )
    return consumers


async def wait_caught_up(settings: RecordsSettings, databases: Databases, *, timeout: float = 60.0) -> None:
    """Until every shard's coupon consumer has applied everything on ``coupon-events`` now (a shard move waits
    here, with registry's events for the moving municipality held back, so none is in flight while records'
    rows move). Raises :class:`ShardMoveError` after ``timeout`` seconds (are the consumers running?)."""
    topic = settings.bus.coupon_topic
    source = make_source(settings.bus, consumer=f"{settings.consumer_name}-shard-move", topic=topic)
    try:
        await source.assign(dict.fromkeys(await source.partitions(), 0))
        ends = await source.end_offsets()
    finally:
        await source.close()
    deadline = time.monotonic() + timeout
    while True:
        behind: dict[str, int] = {}
        for shard, database in sorted(databases.shards.items()):
            async with database.sessionmaker() as session:
                stored = await Bookkeeping(session, consumer_bookkeeping).offsets(settings.consumer_name, topic)
            missing = sum(max(0, end - stored.get(p, 0)) for p, end in ends.items())
            if missing:
                behind[shard] = missing
        if not behind:
            return
        if time.monotonic() > deadline:
            raise ShardMoveError(
                f"records' coupon consumers are behind {topic} ({behind} events) after {timeout:.0f}s: "
                "are they running (`vrs consume records` or VRS_RECORDS_RUN_CONSUMER)?"
            )
        await asyncio.sleep(0.1)
