"""records' ``vrs`` worker processes."""

from __future__ import annotations

import asyncio
import signal

from services.records.consumer import coupon_consumers
from services.records.models import outbox
from services.records.settings import RecordsSettings
from shared.bus.offsets import report_lag_forever
from shared.consumer import stored_positions
from shared.db import Databases
from shared.observability import setup_worker
from shared.outbox import run_relay_process


def relay() -> None:
    """``vrs relay records``: publish records' outbox to ``dose-events``."""
    settings = RecordsSettings()
    setup_worker(service="records-relay", log_level=settings.log_level, metrics_port=settings.metrics_port)
    asyncio.run(run_relay_process(settings, outbox, topic=settings.bus.topic))


async def _consume(settings: RecordsSettings) -> None:
    databases = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=4)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    consumers = coupon_consumers(settings, databases)
    # One consumer per shard, each with its own positions: lag is reported per shard.
    lag = [
        asyncio.create_task(report_lag_forever(settings.bus, c.topic, f"{c.name}-{shard}", stored_positions(c)))
        for shard, c in zip(databases.shards, consumers, strict=True)
    ]
    try:
        for consumer in consumers:
            consumer.start()
        await stop.wait()
    finally:
        for task in lag:
            task.cancel()
        for consumer in consumers:
            await consumer.stop()
        await databases.dispose()


def consume() -> None:
    """``vrs consume records``: apply ``coupon-events`` to the coupon projection of every shard."""
    settings = RecordsSettings()
    setup_worker(service="records-coupon-consumer", log_level=settings.log_level, metrics_port=settings.metrics_port)
    asyncio.run(_consume(settings))
