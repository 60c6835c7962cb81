from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.gateway.audit import AuditTrail
from services.gateway.policy import Upstream
from services.gateway.proxy import create_transport
from services.gateway.router import router
from services.gateway.service import Gateway
from services.gateway.settings import GatewaySettings
from shared.app import build_app
from shared.db import Databases


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.databases = Databases.connect(settings.main_dsn, pool_size=settings.pool_size)
        app.state.transport = create_transport(settings)
        app.state.audit = AuditTrail(app.state.databases)
        app.state.gateway = Gateway(
            upstreams={
                Upstream.REGISTRY: settings.registry_url,
                Upstream.RECORDS: settings.records_url,
                Upstream.STATS: settings.stats_url,
            },
            transport=app.state.transport,
            tokens=app.state.token_verifier,
            audit=app.state.audit,
            max_body_bytes=settings.max_body_bytes,
        )
        try:
            yield
        finally:
            await app.state.transport.close()
            await app.state.databases.dispose()

    async def ready(app: FastAPI) -> None:
        await app.state.databases.ping()
        await app.state.gateway.check_upstreams(timeout=settings.proxy_connect_timeout_seconds + 1)

    return build_app(service="gateway", settings=settings, lifespan=lifespan, routers=[router], ready=ready)
