"""The one way a VRS service app is put together: errors, health, metrics and auth wired the same."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from fastapi import APIRouter, FastAPI

from shared.auth import GatewayOnly, InternalTokenVerifier
from shared.errors import install_error_handlers
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
    app = FastAPI(
        title=f"VRS {service}",
        version="1",
        lifespan=lifespan,
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


# The cyclic collector's first threshold: tracked objects allocated (net) before a young collection. Python's
# 700 suits a program whose objects die young; a dose batch holds ~50,000 of them for its whole request (its
# 1,000 items, their facts, rows, events and answers), so every collection found thousands alive, walked them and
# promoted them, and the older generations' collections walked them again. In records under batches that was
# 1.6-1.8 s of collections in 15 s of one process (a sixth of its CPU), 0.5 s of it in full collections of ~50 ms
# each (vrs_gc_pause_seconds). With 100,000 most of a request's objects are freed before any collection sees
# them; the heap grows by at most that many objects.
YOUNG_OBJECTS = 100_000


def settle_heap() -> None:
    """Once a process has built what it keeps for its life (code, schemas, pools, clients): those objects out of
    the collector's way (``gc.freeze``; a full collection of the ~170,000 a service imports took 40-90 ms), and
    young collections only every :data:`YOUNG_OBJECTS` allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_OBJECTS, 10, 10)
