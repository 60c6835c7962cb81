from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.registry.crypto import MyNumberVault
from services.registry.router import internal, router
from services.registry.settings import RegistrySettings
from shared.app import build_app
from shared.db import Databases
from shared.internal import InternalClient


def create_app(settings: RegistrySettings | None = None) -> FastAPI:
    settings = settings or RegistrySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.databases = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=settings.pool_size)
        app.state.vault = MyNumberVault(settings)
        app.state.records = InternalClient(settings.records_url)
        try:
            yield
        finally:
            await app.state.records.close()
            await app.state.databases.dispose()

    async def ready(app: FastAPI) -> None:
        await app.state.databases.ping()

    return build_app(service="registry", settings=settings, lifespan=lifespan, routers=[router, internal], ready=ready)
