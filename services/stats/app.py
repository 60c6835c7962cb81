from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.stats.consumer import StatsConsumer
from services.stats.dashboard import load_echarts
from services.stats.population import Population, PopulationError, load_population
from services.stats.router import router
from services.stats.service import AnswerCache
from services.stats.settings import StatsSettings
from shared.app import build_app
from shared.db import Databases

log = logging.getLogger(__name__)


def _population(settings: StatsSettings) -> Population | str:
    """The table, or why it is unusable: counts are served without it, coverage answers 503 with the reason."""
    try:
        return load_population(settings.population_path)
    except PopulationError as exc:
        log.warning("coverage rates disabled: %s", exc)
        return str(exc)


def create_app(settings: StatsSettings | None = None) -> FastAPI:
    settings = settings or StatsSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.population = _population(settings)
        app.state.echarts = load_echarts(settings.echarts_path)
        if isinstance(app.state.echarts, str):
            log.warning("dashboard unavailable: %s", app.state.echarts)
        app.state.databases = Databases.connect(settings.main_dsn, pool_size=settings.pool_size)
        app.state.answers = AnswerCache(entries=settings.answer_cache_entries)
        consumer: StatsConsumer | None = None
        if settings.run_consumer:
            consumer = StatsConsumer.from_settings(app.state.databases.main, settings)
            consumer.start()
        app.state.consumer = consumer
        try:
            yield
        finally:
            if consumer is not None:
                await consumer.stop()
            await app.state.databases.dispose()

    async def ready(app: FastAPI) -> None:
        await app.state.databases.ping()

    return build_app(service="stats", settings=settings, lifespan=lifespan, routers=[router], ready=ready)
