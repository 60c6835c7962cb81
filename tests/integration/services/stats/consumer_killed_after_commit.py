"""A stats consumer process that SIGKILLs itself right after its Nth database commit, before the offsets
reach Kafka: the crash the consumer-group test needs. Run as a script by that test (not collected)."""

from __future__ import annotations

import asyncio
import os
import signal

from services.stats.consumer import StatsConsumer
from services.stats.settings import StatsSettings
from shared.bus import Source, make_source
from shared.db import Database
from shared.settings import BusSettings

KILL_AT = int(os.environ["KILL_AT_COMMIT"])


class KilledBeforeCommit:
    """The real source, except that the KILL_AT-th offset commit to Kafka never happens."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.commits = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def commit(self, positions: dict[int, int]) -> None:
        self.commits += 1
        if self.commits >= KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        await self.inner.commit(positions)


async def main() -> None:
    settings = StatsSettings()
    database = Database.connect(settings.main_dsn, pool_size=2)

    def source(bus: BusSettings, name: str) -> Source:
        wrapped: Source = KilledBeforeCommit(make_source(bus, consumer=name))  # type: ignore[assignment]
        return wrapped

    consumer = StatsConsumer(
        database,
        bus=settings.bus,
        group=settings.consumer_name,
        max_records=20,
        source_factory=source,
        bus_commit_interval=0,  # a bus commit after every database commit: the crash lands between the two
    )
    await consumer.run()


if __name__ == "__main__":
    asyncio.run(main())
