"""stats' ``vrs`` subcommands: ``vrs consume stats`` runs a consumer process without the API;
``vrs stats rebuild`` replays the topic into fresh aggregates and swaps them in (see :mod:`services.stats.rebuild`).

Run as many as the topic has partitions (more stand by): they share the partitions through the bus's group
(see :mod:`services.stats.consumer`). Configured like the service (``VRS_STATS_*``, ``VRS_BUS_*``). Give
the API processes ``VRS_STATS_RUN_CONSUMER=false`` when consumers run on their own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import Any

import uvloop

from services.stats.consumer import StatsConsumer
from services.stats.settings import StatsSettings
from shared.db import Database
from shared.observability import setup_worker, stop_on_signals

log = logging.getLogger(__name__)


async def run_consumer(settings: StatsSettings, *, stop: asyncio.Event) -> None:
    """Apply dose events until ``stop`` is set; then leave the group cleanly (partitions move at once)."""
    database = Database.connect(settings.main_dsn, pool_size=2)
    consumer = StatsConsumer.from_settings(database, settings)
    try:
        consumer.start()
        await stop.wait()
    finally:
        await consumer.stop()
        await database.engine.dispose()


def consume() -> None:
    """``vrs consume stats``: apply dose events without the API; several processes share the partitions."""
    settings = StatsSettings()
    # JSON log lines like the API processes', and /metrics on VRS_STATS_METRICS_PORT (no HTTP server here).
    setup_worker(service="stats-consumer", log_level=settings.log_level, metrics_port=settings.metrics_port)

    async def main() -> None:
        stop = stop_on_signals()
        log.info(
            "stats consumer %s starting on %s topic %s", settings.consumer_name, settings.bus.kind, settings.bus.topic
        )
        await run_consumer(settings, stop=stop)

    # uvloop, as uvicorn runs the API processes: the consumer's database and bus traffic cost less loop time.
    uvloop.run(main())


def _rebuild(args: argparse.Namespace) -> int:
    from services.stats.rebuild import RebuildFailed, rebuild

    settings = StatsSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> int:
        database = Database.connect(settings.main_dsn, pool_size=2)
        started = time.monotonic()
        try:
            result = await rebuild(database, settings, idle=args.idle)
        except RebuildFailed as exc:
            print(f"vrs stats rebuild: {exc}", file=sys.stderr)
            return 1
        finally:
            await database.engine.dispose()
        took = time.monotonic() - started
        print(
            f"rebuilt from {result.events_applied} events in {took:.1f} s "
            f"({args.idle:g} s of it waiting for more at the end); swapped in at offsets {result.offsets}"
        )
        return 0

    return asyncio.run(main())


def register(sub: Any) -> None:
    commands = sub.add_parser("stats", help="stats operations").add_subparsers(required=True, metavar="COMMAND")
    rebuild = commands.add_parser("rebuild", help="replay dose-events into fresh aggregates and swap them in")
    rebuild.add_argument(
        "--idle", type=float, default=1.0, help="seconds without a new message that count as caught up"
    )
    rebuild.set_defaults(func=_rebuild)
