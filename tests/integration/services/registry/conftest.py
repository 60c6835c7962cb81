"""Fixtures of registry's tests on PostgreSQL with two shards (helpers in ``registry_support``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from services.registry.settings import RegistrySettings
from tests.integration.services.registry.registry_support import Registry, migrated_registry, serve


@pytest.fixture
async def registry_settings(make_database: Callable[..., str]) -> RegistrySettings:
    return await migrated_registry(make_database, import_batch_size=3)


@pytest.fixture
async def registry(registry_settings: RegistrySettings) -> AsyncIterator[Registry]:
    async for served in serve(registry_settings):
        yield served
