"""The one way a VRS service app is put together: errors, health, metrics and auth wired the same."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import APIRouter, FastAPI

from shared.auth import GatewayOnly, InternalTokenVerifier
from shared.errors import install_error_handlers
from shared.heap import settle_heap, unsettle_heap
from shared.observability import configure_logging, install_health, watch_gc
from shared.settings import ServiceSettings


def build_app(
    *,
    service: str,
    settings: ServiceSettings,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
    routers: list[APIRouter],
    ready: Callable[[FastAPI], Awaitable[None]],
    behind_gateway: bool = True,
    collect_metrics: Callable[[FastAPI], Awaitable[None]] | None = None,
    grant_only_paths: frozenset[str] = frozenset(),
) -> FastAPI:
    """``behind_gateway``: every request needs the gateway's internal token (all but the gateway itself),
    except on ``grant_only_paths``, whose endpoints require a registry-signed grant instead."""
    configure_logging(settings.log_level, service)
    watch_gc()

    @asynccontextmanager
    async def settled(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(app):
            settle_heap()  # what the service built on starting lives as long as it
            try:
                yield
            finally:
                unsettle_heap()

    app = FastAPI(
        title=f"VRS {service}",
        version="1",
        lifespan=settled,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    if behind_gateway:
        app.state.token_verifier = InternalTokenVerifier(settings.auth)
        app.add_middleware(GatewayOnly, verifier=app.state.token_verifier, grant_only_paths=grant_only_paths)

    async def check_ready() -> None:
        await ready(app)

    async def collect() -> None:
        if collect_metrics is not None:
            await collect_metrics(app)

    install_health(app, service=service, ready=check_ready, collect=collect)
    for router in routers:
        app.include_router(router)
    return app
