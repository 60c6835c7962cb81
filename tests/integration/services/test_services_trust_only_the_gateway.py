"""Each service, in-process: nothing without the gateway's internal token, and scope checked again inside.

A caller's own identity token is not enough (the services do not trust the identity provider, only the
gateway); the internal endpoints registry uses take the municipality's forwarded token and re-check its code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from devtools.tokens import bearer_headers
from services.records.app import create_app as records_app
from services.records.settings import RecordsSettings
from services.registry.app import create_app as registry_app
from services.registry.settings import RegistrySettings
from services.stats.app import create_app as stats_app
from services.stats.settings import StatsSettings
from shared.auth import Role
from shared.migrations import SERVICES_DIR, upgrade
from shared.settings import BusSettings
from tests.factories import internal_headers

CHIYODA, SAPPORO, CLINIC = "131016", "011002", "1312345678"


async def migrated(tmp_path: Path, service: str, *, shards: bool) -> tuple[str, dict[str, str]]:
    main = f"sqlite+aiosqlite:///{tmp_path / f'{service}-main.db'}"
    await asyncio.to_thread(upgrade, main, SERVICES_DIR / service / "migrations" / "main")
    shard_dsns = {}
    if shards:
        for name in ("s0", "s1"):
            shard_dsns[name] = f"sqlite+aiosqlite:///{tmp_path / f'{service}-{name}.db'}"
            await asyncio.to_thread(upgrade, shard_dsns[name], SERVICES_DIR / service / "migrations" / "shard")
    return main, shard_dsns


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    bus = BusSettings(kind="embedded", embedded_path=tmp_path / "events.db")
    registry_main, registry_shards = await migrated(tmp_path, "registry", shards=True)
    records_main, records_shards = await migrated(tmp_path, "records", shards=True)
    stats_main, _ = await migrated(tmp_path, "stats", shards=False)
    apps: dict[str, FastAPI] = {
        "registry": registry_app(
            RegistrySettings(
                main_dsn=registry_main,
                shard_dsns=registry_shards,
                bus=bus,
                run_relay=False,
                records_url="http://127.0.0.1:9",
            )
        ),
        "records": records_app(
            RecordsSettings(
                main_dsn=records_main, shard_dsns=records_shards, bus=bus, run_relay=False, run_consumer=False
            )
        ),
        "stats": stats_app(StatsSettings(main_dsn=stats_main, bus=bus, run_consumer=False)),
    }
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for name, app in apps.items():
            await stack.enter_async_context(app.router.lifespan_context(app))
            clients[name] = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{name}")
            )
        yield clients


PATHS = {
    "registry": f"/api/v1/municipalities/{CHIYODA}/residents/anyone",
    "records": f"/api/v1/municipalities/{CHIYODA}/doses",
    "stats": "/api/v1/stats/doses",
}


@pytest.mark.parametrize("service", sorted(PATHS))
async def test_no_internal_token_no_answer(services: dict[str, httpx.AsyncClient], service: str) -> None:
    client = services[service]
    for headers in ({}, bearer_headers(Role.MUNICIPALITY, municipality=CHIYODA), {"Authorization": "Bearer x.y.z"}):
        for path in (PATHS[service], "/docs", "/openapi.json", "/internal/v1/anything"):
            response = await client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.json()["error"] == "Unauthorized"
    assert (await client.get("/healthz")).status_code == 200
    own = await client.get(PATHS[service], headers=internal_headers(Role.MUNICIPALITY, municipality=CHIYODA))
    assert own.status_code != 401


async def test_records_internal_reads_recheck_the_forwarded_scope(services: dict[str, httpx.AsyncClient]) -> None:
    path = f"/internal/v1/municipalities/{CHIYODA}/doses?coupon_number=0000012345"
    records = services["records"]
    own = await records.get(path, headers=internal_headers(Role.MUNICIPALITY, municipality=CHIYODA))
    assert own.status_code == 200 and own.json() == {"doses": []}
    for headers in (
        internal_headers(Role.MUNICIPALITY, municipality=SAPPORO),
        internal_headers(Role.INSTITUTION, institution=CLINIC),
        internal_headers(Role.NATIONAL),
    ):
        assert (await records.get(path, headers=headers)).status_code == 403
    assert (await records.get(path, headers=internal_headers(Role.ANONYMOUS))).status_code == 401
