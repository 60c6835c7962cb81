"""records — dose records (接種記録), their corrections, the coupon projection and the outbox of dose events."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI

from services.records import repository
from services.records.consumer import coupon_consumers
from services.records.housekeeping import expire_pass
from services.records.imports import ImportWorker
from services.records.models import outbox
from services.records.router import GRANT_ONLY_PATHS, internal, router
from services.records.settings import RecordsSettings
from shared.app import build_app
from shared.bus.offsets import close_clients, report_lag
from shared.consumer import stored_positions
from shared.db import UnitOfWork
from shared.outbox import OutboxNotifier, OutboxRelay, relay_in_background, sample_backlog
from shared.periodic import cancel_and_wait, every_in_background


def _wake_relay(relay: OutboxRelay | OutboxNotifier) -> Callable[[UnitOfWork], None]:
    def hook(uow: UnitOfWork) -> None:
        uow.after_commit(lambda: relay.wake(*uow.touched_shards))

    return hook


def create_app(settings: RecordsSettings | None = None) -> FastAPI:
    settings = settings or RecordsSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        databases = repository.connect(settings.main_dsn, settings.shard_dsns, pool_size=settings.pool_size)
        app.state.databases = databases
        app.state.settings = settings
        try:
            async with relay_in_background(settings, databases, outbox, topic=settings.bus.topic) as relay:
                app.state.relay = relay
                consumers = coupon_consumers(settings, databases, relay=relay) if settings.run_consumer else []
                app.state.consumers = consumers
                for consumer in consumers:
                    consumer.start()
                imports = None
                if settings.run_imports:
                    app.state.imports = ImportWorker(
                        databases,
                        chunk_rows=settings.import_chunk_rows,
                        after_commit=_wake_relay(relay),
                    )
                    imports = asyncio.create_task(app.state.imports.run(), name="dose-imports")
                expiry = None
                if settings.key_expiry_seconds > 0:
                    keep = timedelta(days=settings.idempotency_keep_days)
                    expiry = every_in_background(
                        settings.key_expiry_seconds,
                        functools.partial(expire_pass, databases, keep=keep),
                        name="idempotency key expiry",
                    )
                try:
                    yield
                finally:
                    await cancel_and_wait(expiry, imports)
                    for consumer in consumers:
                        await consumer.stop()
        finally:
            await asyncio.to_thread(close_clients)  # the Kafka client /metrics kept for the consumers' lag
            await databases.dispose()

    async def ready(app: FastAPI) -> None:
        await app.state.databases.ping()

    async def collect_metrics(app: FastAPI) -> None:
        await sample_backlog("records", app.state.databases, outbox)
        # Where the coupon consumers run in this process (the embedded default): their lag, per shard.
        for shard, consumer in zip(app.state.databases.shards, app.state.consumers, strict=False):
            await report_lag(settings.bus, consumer.topic, f"{consumer.name}-{shard}", stored_positions(consumer))

    return build_app(
        service="records",
        settings=settings,
        lifespan=lifespan,
        routers=[router, internal],
        ready=ready,
        collect_metrics=collect_metrics,
        grant_only_paths=GRANT_ONLY_PATHS,
    )
