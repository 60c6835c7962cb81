"""registry — residents (接種者情報), coupons and the My Number directory, sharded by municipality."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.registry.certificates import Issuer, sweep_pass
from services.registry.crypto import MyNumberVault
from services.registry.housekeeping import purge_pass
from services.registry.importer import ResidentImporter
from services.registry.models import outbox
from services.registry.router import public, router
from services.registry.settings import RegistrySettings
from shared.app import build_app
from shared.db import Databases
from shared.internal import InternalClient
from shared.outbox import relay_in_background, sample_backlog
from shared.periodic import cancel_and_wait, every_in_background


def create_app(settings: RegistrySettings | None = None) -> FastAPI:
    settings = settings or RegistrySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        databases = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=settings.pool_size)
        app.state.databases = databases
        app.state.settings = settings
        app.state.vault = MyNumberVault(settings)
        app.state.issuer = Issuer.from_settings(settings)
        app.state.records = InternalClient(settings.records_url)
        try:
            async with relay_in_background(settings, databases, outbox, topic=settings.bus.coupon_topic) as relay:
                app.state.relay = relay
                app.state.importer = ResidentImporter(
                    databases,
                    app.state.vault,
                    batch_size=settings.import_batch_size,
                    workers=settings.import_workers,
                    workers_min_bytes=settings.import_workers_min_bytes,
                    on_commit=lambda shards: relay.wake(*shards),
                )
                if settings.run_imports:
                    await app.state.importer.resume()
                sweeper = None
                if settings.certificate_sweep_seconds > 0:
                    sweeper = every_in_background(
                        settings.certificate_sweep_seconds,
                        functools.partial(
                            sweep_pass,
                            databases,
                            app.state.records,
                            app.state.issuer,
                            batch_size=settings.certificate_sweep_batch,
                        ),
                        name="certificate sweep",
                        first_after=0,
                    )
                purge = None
                if settings.disclosure_purge_seconds > 0:
                    purge = every_in_background(
                        settings.disclosure_purge_seconds,
                        functools.partial(purge_pass, databases, keep_years=settings.disclosure_keep_years),
                        name="transfer disclosure purge",
                    )
                try:
                    yield
                finally:
                    await cancel_and_wait(sweeper, purge)
                    await app.state.importer.close()
        finally:
            await app.state.records.close()
            await databases.dispose()

    async def ready(app: FastAPI) -> None:
        await app.state.databases.ping()

    async def collect_metrics(app: FastAPI) -> None:
        await sample_backlog("registry", app.state.databases, outbox)

    return build_app(
        service="registry",
        settings=settings,
        lifespan=lifespan,
        routers=[router, public],
        ready=ready,
        collect_metrics=collect_metrics,
    )
