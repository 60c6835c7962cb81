"""The consumer of ``dose-events``: each event changes the aggregates exactly once.

The loop, the bookkeeping and the sharing of partitions between processes are the project's idempotent
consumer (:mod:`shared.consumer`); what is stats' own is the batch — decode, claim the event ids, fold the
events into one delta per cell, add them — and its metrics.

Start it with :meth:`StatsConsumer.start` (a background task) and stop it with :meth:`StatsConsumer.stop`;
:meth:`StatsConsumer.drain` applies everything currently on the bus and returns (tests, rebuilds).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.ext.asyncio import AsyncSession

from services.stats import service
from services.stats.models import LIVE, Aggregates, consumer_bookkeeping
from services.stats.service import BatchOutcome
from services.stats.settings import StatsSettings
from shared.bus import Message, Source, make_source
from shared.consumer import IdempotentConsumer
from shared.db import Database, utcnow
from shared.observability import observe_event_ages
from shared.settings import BusSettings

log = logging.getLogger(__name__)

EVENTS_APPLIED = Counter("vrs_stats_events_applied", "Dose events applied to the aggregates", ["type"])
EVENTS_DUPLICATE = Counter("vrs_stats_events_duplicate", "Dose events skipped as already applied")
EVENTS_UNDECODABLE = Counter("vrs_stats_events_undecodable", "Messages skipped because they are no valid event")
CONSUMER_ERRORS = Counter("vrs_stats_consumer_errors", "Batches that failed (database or bus); retried")
# Fine below 2 s, where the freshness target (p99 ≤ 1 s) is judged; hours or days while a replay catches up.
LAG_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1, 1.25, 1.5, 2)
LAG_BUCKETS += (2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600)
EVENT_LAG = Histogram(
    "vrs_stats_event_lag_seconds",
    "Event age when applied: from the event's occurred_at (records accepted the change) to the commit that "
    "applied it to the aggregates",
    buckets=LAG_BUCKETS,
)
NEXT_OFFSET = Gauge("vrs_stats_consumer_next_offset", "Next offset to read, as committed", ["consumer", "partition"])
CONSUMER_LAG = Gauge(
    "vrs_stats_consumer_lag",
    "Messages on the partition not applied yet (end offset minus committed), for the partitions this process holds",
    ["consumer", "partition"],
)

SourceFactory = Callable[[BusSettings, str], Source]


def _default_source(bus: BusSettings, consumer: str) -> Source:
    return make_source(bus, consumer=consumer)


class StatsConsumer(IdempotentConsumer):
    def __init__(
        self,
        database: Database,
        *,
        bus: BusSettings,
        name: str = "stats",
        max_records: int = 500,
        poll_timeout: float = 1.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        source_factory: SourceFactory = _default_source,
        group: str | None = None,
        lag_interval: float = 5.0,
        prune_interval: float = 300.0,
        keep_offsets: int = 1_000_000,
        keep_seconds: float = 7 * 24 * 3600,
        aggregates: Aggregates = LIVE,
        bus_commit_interval: float = 1.0,
        linger: float = 0.0,
    ) -> None:
        self.bus = bus
        self.aggregates = aggregates  # the live aggregates, or a rebuild's shadow tables
        self._outcome: BatchOutcome | None = None
        super().__init__(
            database,
            consumer_bookkeeping,
            name=name,
            topic=bus.topic,
            source_factory=lambda: source_factory(bus, name),
            handler=self._apply,
            driver_handler=self._apply,
            max_records=max_records,
            poll_timeout=poll_timeout,
            retry_initial=retry_initial,
            retry_max=retry_max,
            group=group,
            lag_interval=lag_interval,
            prune_interval=prune_interval,
            keep_offsets=keep_offsets,
            keep_seconds=keep_seconds,
            on_error=CONSUMER_ERRORS.inc,
            on_positions=self._positions_metrics,
            on_lag=lambda partition, lag: CONSUMER_LAG.labels(self.name, str(partition)).set(lag),
            bus_commit_interval=bus_commit_interval,
            linger=linger,
        )

    @classmethod
    def from_settings(cls, database: Database, settings: StatsSettings) -> StatsConsumer:
        return cls(
            database,
            bus=settings.bus,
            name=settings.consumer_name,
            max_records=settings.poll_max_records,
            poll_timeout=settings.poll_timeout_seconds,
            retry_initial=settings.retry_initial_seconds,
            retry_max=settings.retry_max_seconds,
            group=settings.consumer_name if settings.consumer_group else None,
            prune_interval=settings.prune_interval_seconds,
            keep_offsets=settings.processed_keep_offsets,
            keep_seconds=settings.processed_keep_seconds,
            linger=settings.poll_linger_seconds,
        )

    async def _apply(self, database: AsyncSession | Any, messages: Sequence[Message]) -> int:
        """The handler of a batch, in its session or (PostgreSQL) on its transaction's asyncpg connection."""
        self._outcome = None  # a batch whose transaction fails leaves nothing to observe
        self._outcome = await service.apply_messages(
            database, consumer=self.name, topic=self.topic, messages=messages, now=utcnow(), aggregates=self.aggregates
        )
        return len(self._outcome.applied)

    async def step(self, *, timeout: float | None = None) -> int | None:
        applied = await super().step(timeout=timeout)
        outcome, self._outcome = self._outcome, None
        if applied is not None and outcome is not None:
            self._observe(outcome)
        return applied

    def _observe(self, outcome: BatchOutcome) -> None:
        committed_at = utcnow()
        occurred = [service.to_utc(e.occurred_at) for e in outcome.applied]
        for at in occurred:
            EVENT_LAG.observe(max(0.0, (committed_at - at).total_seconds()))
        # A batch's events come in a few types: one labelled child and one increment per type.
        for kind, n in collections.Counter(e.type.value for e in outcome.applied).items():
            EVENTS_APPLIED.labels(kind).inc(n)
        observe_event_ages(self.name, self.topic, occurred)
        if outcome.duplicates:
            EVENTS_DUPLICATE.inc(outcome.duplicates)
        if outcome.undecodable:
            EVENTS_UNDECODABLE.inc(outcome.undecodable)

    def _positions_metrics(self, positions: dict[int, int], dropped: set[int]) -> None:
        for partition in dropped:
            for gauge in (NEXT_OFFSET, CONSUMER_LAG):
                with contextlib.suppress(KeyError):
                    gauge.remove(self.name, str(partition))
        for partition, offset in positions.items():
            NEXT_OFFSET.labels(self.name, str(partition)).set(offset)
