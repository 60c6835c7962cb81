"""The one way a VRS service app is put together: errors, health, metrics and auth wired the same."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from fastapi import APIRouter, FastAPI

from shared.auth import TokenVerifier
from shared.errors import install_error_handlers
from shared.observability import configure_logging, install_health
from shared.settings import ServiceSettings


def build_app(
    *,
    service: str,
    settings: ServiceSettings,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
    routers: list[APIRouter],
    ready: Callable[[FastAPI], Awaitable[None]],
    collect_metrics: Callable[[FastAPI], Awaitable[None]] | None = None,
) -> FastAPI:
    configure_logging(settings.log_level, service)
    app = FastAPI(
        title=f"VRS {service}",
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.auth_settings = settings.auth
    app.state.token_verifier = TokenVerifier(
        settings.auth, cache_size=settings.auth.token_cache_size, ttl_seconds=settings.auth.token_cache_seconds
    )
    install_error_handlers(app)

    async def check_ready() -> None:
        await ready(app)

    async def collect() -> None:
        if collect_metrics is not None:
            await collect_metrics(app)

    install_health(app, service=service, ready=check_ready, collect=collect)
    for router in routers:
        app.include_router(router)
    return app
