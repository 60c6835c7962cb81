"""Fixtures for the gateway: the fake upstreams and the gateway app on each transport (see gateway_fakes)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from devtools.harness import free_port
from devtools.tokens import bearer_headers
from services.gateway.audit import FileAnchorStore
from services.gateway.settings import GatewaySettings
from shared.auth import Role
from shared.db import Database, Databases
from shared.migrations import upgrade
from tests.integration.services.gateway.gateway_fakes import MIGRATIONS, FakeUpstream, fake_app, running_gateway, serve


@pytest.fixture(scope="session")
async def upstreams() -> AsyncIterator[dict[str, FakeUpstream]]:
    fakes = {name: FakeUpstream(name) for name in ("registry", "records", "stats")}
    async with contextlib.AsyncExitStack() as stack:
        for fake in fakes.values():
            fake.url = await stack.enter_async_context(serve(fake_app(fake)))
        yield fakes


@pytest.fixture(scope="session")
async def gateway_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    dsn = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('gateway') / 'main.db'}"
    # Alembic runs its own event loop: keep it off the test's.
    await asyncio.to_thread(upgrade, dsn, MIGRATIONS)
    return dsn


@pytest.fixture(scope="session", params=["raw", "aiohttp", "httpx"])
async def gateway(
    request: pytest.FixtureRequest,
    upstreams: dict[str, FakeUpstream],
    gateway_dsn: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The gateway on each transport, in front of the fake upstreams."""
    settings = GatewaySettings(
        main_dsn=gateway_dsn,
        registry_url=upstreams["registry"].url,
        records_url=upstreams["records"].url,
        stats_url=upstreams["stats"].url,
        proxy_transport=request.param,
        proxy_timeout_seconds=1.0,
        instance_id=f"gw-{request.param}",
        audit_anchor_dir=tmp_path_factory.mktemp("anchors"),
    )
    async with running_gateway(settings) as running:
        yield running


@pytest.fixture
def gateway_settings(gateway_dsn: str, tmp_path: Path) -> Callable[..., GatewaySettings]:
    """``gateway_settings(**overrides)``: settings on the shared test database, with a chain of their own."""

    def make(**overrides: Any) -> GatewaySettings:
        fields: dict[str, Any] = {
            "main_dsn": gateway_dsn,
            "instance_id": f"gw-{uuid.uuid4().hex[:12]}",
            "audit_anchor_dir": tmp_path / "anchors",
            # One chain (the default), so that a test reads its entries in order; several: test_gateway_audit.py.
            "audit_chains": 1,
            **overrides,
        }
        return GatewaySettings(**fields)

    return make


@pytest.fixture
def client(gateway: tuple[FastAPI, httpx.AsyncClient]) -> httpx.AsyncClient:
    return gateway[1]


@pytest.fixture
def gateway_db(gateway: tuple[FastAPI, httpx.AsyncClient]) -> Database:
    database: Database = gateway[0].state.databases.main
    return database


@pytest.fixture(scope="session")
def token() -> Callable[..., dict[str, str]]:
    """``token(role, municipality=..., institution=...)`` → a caller's Authorization header (development key)."""

    def make(role: Role, **claims: Any) -> dict[str, str]:
        return bearer_headers(role, **claims)

    return make


@pytest.fixture
def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def audit_dbs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Databases]:
    if request.param == "postgres":
        make_database: Callable[..., str] = request.getfixturevalue("make_database")
        dsn = make_database("gateway", MIGRATIONS)
    else:
        migrated_sqlite: Callable[[Path, Path], str] = request.getfixturevalue("migrated_sqlite")
        dsn = migrated_sqlite(tmp_path / "audit.db", MIGRATIONS)
    databases = Databases.connect(dsn, pool_size=5)
    try:
        yield databases
    finally:
        await databases.dispose()


@pytest.fixture
def anchors(tmp_path: Path) -> FileAnchorStore:
    return FileAnchorStore(tmp_path / "anchors")
