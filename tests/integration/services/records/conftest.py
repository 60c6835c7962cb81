"""Fixtures of records' service-level tests (helpers in ``records_support``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from shared.db import Databases
from tests.integration.services.records.records_support import TREES, pin_municipalities, recorder, records_databases


@pytest.fixture
async def databases(make_database: Callable[..., str]) -> AsyncIterator[Databases]:
    async for dbs in records_databases(make_database):
        yield dbs


@pytest.fixture
def record(databases: Databases) -> Callable[..., Any]:
    return recorder(databases)


@pytest.fixture
async def sqlite_databases(tmp_path: Path, migrated_sqlite: Callable[[Path, Path], str]) -> AsyncIterator[Databases]:
    urls = {
        name: migrated_sqlite(tmp_path / f"{name}.db", TREES / ("main" if name == "main" else "shard"))
        for name in ("main", "s0", "s1")
    }
    dbs = Databases.connect(urls["main"], {"s0": urls["s0"], "s1": urls["s1"]})
    await pin_municipalities(dbs)
    yield dbs
    await dbs.dispose()
