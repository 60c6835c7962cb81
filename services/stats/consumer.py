"""The idempotent consumer of ``dose-events``: each event changes the aggregates exactly once.

One polled batch is one database transaction holding the count changes, the ids of the events applied and
the next offset per partition. The bus's in-memory position is never trusted beyond that transaction:
after any error the source is closed and reopened at the offsets the database holds, so a crash at any
point neither loses an event nor counts one twice, and a redelivered event is recognised by its id.

Several consumer processes can share the work: with ``group`` set they join a group on the bus (a Kafka
consumer group; the embedded log's lease) and each applies the partitions it is given, positioned at the
offsets the database holds — a partition moving between members resumes exactly where the last commit left
it. After each database commit the offsets are also committed to the bus, only so that operators see the
group's lag there; a member killed between the two commits leaves the bus's offsets behind, which costs
nothing because they are never read back.

Start it with :meth:`StatsConsumer.start` (a background task) and stop it with :meth:`StatsConsumer.stop`;
:meth:`StatsConsumer.drain` applies everything currently on the bus and returns (tests, rebuilds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import Table

from services.stats import service
from services.stats.models import dose_counts
from services.stats.service import BatchOutcome
from services.stats.settings import StatsSettings
from shared.bus import Message, Source, make_source
from shared.db import Database, utcnow
from shared.settings import BusSettings

log = logging.getLogger(__name__)

EVENTS_APPLIED = Counter("vrs_stats_events_applied", "Dose events applied to the aggregates", ["type"])
EVENTS_DUPLICATE = Counter("vrs_stats_events_duplicate", "Dose events skipped as already applied")
EVENTS_UNDECODABLE = Counter("vrs_stats_events_undecodable", "Messages skipped because they are no valid event")
CONSUMER_ERRORS = Counter("vrs_stats_consumer_errors", "Batches that failed (database or bus); retried")
EVENT_LAG = Histogram(
    "vrs_stats_event_lag_seconds",
    "From an event's occurred_at to the commit that applied it",
    # Seconds when live; hours or days while a replay catches up.
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600),
)
NEXT_OFFSET = Gauge("vrs_stats_consumer_next_offset", "Next offset to read, as committed", ["consumer", "partition"])
CONSUMER_LAG = Gauge(
    "vrs_stats_consumer_lag",
    "Messages on the partition not applied yet (end offset minus committed), for the partitions this process holds",
    ["consumer", "partition"],
)
PRUNED = Counter("vrs_stats_processed_ids_pruned", "Processed event ids forgotten behind the committed offsets")

SourceFactory = Callable[[BusSettings, str], Source]


def _default_source(bus: BusSettings, consumer: str) -> Source:
    return make_source(bus, consumer=consumer)


class StatsConsumer:
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
        counts: Table = dose_counts,
    ) -> None:
        self.database = database
        self.bus = bus
        self.name = name
        self.max_records = max_records
        self.poll_timeout = poll_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._source_factory = source_factory
        self._source: Source | None = None
        self._task: asyncio.Task[None] | None = None
        # Partitions held and their committed next offsets (None: every partition of the topic, no group).
        self.group = group
        self._positions: dict[int, int] = {}
        self.lag_interval = lag_interval
        self.prune_interval = prune_interval
        self.keep_offsets = keep_offsets
        self.keep_seconds = keep_seconds
        self.counts = counts
        self._lag_due = 0.0
        self._prune_due = time.monotonic() + prune_interval

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
        )

    async def _open(self) -> Source:
        """A source positioned at the offsets committed with the aggregates (0 for a partition never read).

        In a group the source starts with no partitions; they come (paused) with the group's assignment.
        """
        if self._source is not None:
            return self._source
        source = self._source_factory(self.bus, self.name)
        try:
            if self.group is not None:
                await source.join(self.group)
                positions: dict[int, int] = {}
            else:
                positions = await self._stored(await source.partitions())
                await source.assign(positions)
        except BaseException:
            with contextlib.suppress(Exception):
                await source.close()
            raise
        self._hold(positions)
        self._source = source
        return source

    async def _stored(self, partitions: list[int] | set[int]) -> dict[int, int]:
        async with self.database.sessionmaker() as session:
            stored = await service.stored_offsets(session, consumer=self.name, topic=self.bus.topic)
        return {p: stored.get(p, 0) for p in sorted(partitions)}

    def _hold(self, positions: dict[int, int]) -> None:
        for partition in set(self._positions) - set(positions):
            with contextlib.suppress(KeyError):
                NEXT_OFFSET.remove(self.name, str(partition))
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(self.name, str(partition))
        self._positions = dict(positions)
        for partition, offset in positions.items():
            NEXT_OFFSET.labels(self.name, str(partition)).set(offset)

    async def _rebalanced(self, source: Source, messages: list[Message]) -> list[Message]:
        """Take in a change of the group's assignment; return the messages still this member's to apply."""
        change = source.take_assignment()
        if change is None:
            return messages
        kept = {p: o for p, o in self._positions.items() if p in change.owned and p not in change.added}
        fresh = await self._stored(change.added & change.owned)
        await source.assign(fresh)
        self._hold({**kept, **fresh})
        log.info(
            "stats consumer %s now holds partitions %s (given %s, taken %s)",
            self.name,
            sorted(self._positions),
            sorted(change.added),
            sorted(change.revoked),
        )
        # Anything read from a partition given just now or taken away is left to its (new) owner.
        return [m for m in messages if m.partition in kept]

    async def _reset(self) -> None:
        """Forget the source: its position may be ahead of what the database committed."""
        source, self._source = self._source, None
        if source is not None:
            try:
                await source.close()
            except Exception:
                log.warning("closing the event source failed", exc_info=True)

    async def step(self, *, timeout: float | None = None) -> BatchOutcome | None:
        """Poll once and apply the batch in one transaction; None when nothing arrived within ``timeout``.

        Raises on database or bus errors, after resetting the source so the next call resumes at the
        committed offsets.
        """
        try:
            source = await self._open()
            messages = await source.poll(
                max_records=self.max_records, timeout=self.poll_timeout if timeout is None else timeout
            )
            if self.group is not None:
                messages = await self._rebalanced(source, messages)
            await self._housekeeping(source)
            if not messages:
                return None
            async with self.database.sessionmaker() as session, session.begin():
                outcome = await service.apply_messages(
                    session,
                    consumer=self.name,
                    topic=self.bus.topic,
                    messages=messages,
                    now=utcnow(),
                    counts=self.counts,
                )
        except BaseException:
            # Cancellation included: a batch cut off mid-transaction was rolled back, so the source must
            # not go on from where it had read to.
            await asyncio.shield(self._reset())
            raise
        self._observe(outcome)
        await self._signal_lag(source, outcome.next_offsets)
        return outcome

    async def _signal_lag(self, source: Source, positions: dict[int, int]) -> None:
        """Commit to the bus what the database already holds: monitoring only, so a failure is just logged."""
        if self.group is None or not positions:
            return
        try:
            await source.commit(positions)
        except Exception:
            log.warning("committing offsets to the bus (lag signal) failed", exc_info=True)

    async def _housekeeping(self, source: Source) -> None:
        """Now and then: the lag per partition held, and pruning the processed ids far behind the offsets."""
        now = time.monotonic()
        if now >= self._lag_due:
            self._lag_due = now + self.lag_interval
            try:
                ends = await source.end_offsets()
            except Exception:
                log.warning("reading the bus's end offsets failed", exc_info=True)
            else:
                for partition, offset in self._positions.items():
                    if partition in ends:
                        CONSUMER_LAG.labels(self.name, str(partition)).set(max(0, ends[partition] - offset))
        if now >= self._prune_due:
            self._prune_due = now + self.prune_interval
            await self.prune()

    async def prune(self) -> int:
        """Forget processed ids no redelivery can bring any more (see :func:`service.prune_processed`)."""
        async with self.database.sessionmaker() as session, session.begin():
            pruned = await service.prune_processed(
                session,
                consumer=self.name,
                topic=self.bus.topic,
                keep_offsets=self.keep_offsets,
                keep_since=utcnow() - timedelta(seconds=self.keep_seconds),
            )
        if pruned:
            PRUNED.inc(pruned)
            log.info("stats consumer %s forgot %d processed event ids", self.name, pruned)
        return pruned

    def _observe(self, outcome: BatchOutcome) -> None:
        committed_at = utcnow()
        for event in outcome.applied:
            EVENTS_APPLIED.labels(event.type.value).inc()
            EVENT_LAG.observe(max(0.0, (committed_at - service.to_utc(event.occurred_at)).total_seconds()))
        if outcome.duplicates:
            EVENTS_DUPLICATE.inc(outcome.duplicates)
        if outcome.undecodable:
            EVENTS_UNDECODABLE.inc(outcome.undecodable)
        for partition, offset in outcome.next_offsets.items():
            self._positions[partition] = offset
            NEXT_OFFSET.labels(self.name, str(partition)).set(offset)

    async def drain(self, *, idle: float = 0.0) -> int:
        """Apply batches until a poll brings nothing within ``idle`` seconds; return the events applied.

        For rebuilds and tests. Errors propagate (after the reset :meth:`step` does). On Kafka give ``idle``
        a second or so: a poll without waiting may come back empty while messages are still being fetched.
        """
        applied = 0
        while (outcome := await self.step(timeout=idle)) is not None:
            applied += len(outcome.applied)
        return applied

    async def run(self) -> None:
        """Apply batches until cancelled; on errors back off (doubling, capped) and resume from the database."""
        delay = self.retry_initial
        try:
            while True:
                try:
                    await self.step()
                except Exception:
                    CONSUMER_ERRORS.inc()
                    log.exception("stats consumer batch failed; retrying in %.1fs", delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.retry_max)
                else:
                    delay = self.retry_initial
        finally:
            await asyncio.shield(self._reset())

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"stats-consumer-{self.name}")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # stop() itself was cancelled, not just the consumer
        await self._reset()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()
