"""Fixtures of records' service-level tests (helpers in ``records_support``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from shared.db import Databases
from tests.integration.services.records.records_support import recorder, records_databases


@pytest.fixture
async def databases(make_database: Callable[..., str]) -> AsyncIterator[Databases]:
    async for dbs in records_databases(make_database):
        yield dbs


@pytest.fixture
def record(databases: Databases) -> Callable[..., Any]:
    return recorder(databases)
