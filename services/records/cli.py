"""records' ``vrs`` worker processes."""

from __future__ import annotations

import asyncio
import signal

from services.records.consumer import coupon_consumers
from services.records.models import outbox
from services.records.settings import RecordsSettings
from shared.db import Databases
from shared.outbox import run_relay_process


def relay() -> None:
    """``vrs relay records``: publish records' outbox to ``dose-events``."""
    settings = RecordsSettings()
    asyncio.run(run_relay_process(settings, outbox, topic=settings.bus.topic))


async def _consume(settings: RecordsSettings) -> None:
    databases = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=4)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    consumers = coupon_consumers(settings, databases)
    try:
        for consumer in consumers:
            consumer.start()
        await stop.wait()
    finally:
        for consumer in consumers:
            await consumer.stop()
        await databases.dispose()


def consume() -> None:
    """``vrs consume records``: apply ``coupon-events`` to the coupon projection of every shard."""
    asyncio.run(_consume(RecordsSettings()))
