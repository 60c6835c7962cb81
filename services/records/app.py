from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.records.registry_client import CouponHolders
from services.records.relay import OutboxRelay
from services.records.router import internal, router
from services.records.settings import RecordsSettings
from shared.app import build_app
from shared.bus import make_publisher
from shared.db import Databases
from shared.internal import InternalClient


def create_app(settings: RecordsSettings | None = None) -> FastAPI:
    settings = settings or RecordsSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        databases = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=settings.pool_size)
        registry = InternalClient(settings.registry_url)
        publisher = make_publisher(settings.bus)
        app.state.databases = databases
        app.state.holders = CouponHolders(registry, cache_seconds=settings.coupon_cache_seconds)
        app.state.relay = None
        task = None
        if settings.run_relay:
            relay = OutboxRelay(
                databases,
                publisher,
                batch_size=settings.relay_batch_size,
                idle_seconds=settings.relay_idle_seconds,
                linger_seconds=settings.relay_linger_seconds,
            )
            app.state.relay = relay
            task = asyncio.create_task(relay.run(), name="outbox-relay")
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await publisher.close()
            await registry.close()
            await databases.dispose()

    async def ready(app: FastAPI) -> None:
        await app.state.databases.ping()

    return build_app(service="records", settings=settings, lifespan=lifespan, routers=[router, internal], ready=ready)
