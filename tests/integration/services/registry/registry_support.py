"""Helpers for registry's tests on real PostgreSQL: a main database and two shards, migrated, with two
municipalities pinned to different shards, and the app served in-process (lifespan included)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import select

from devtools.harness import free_port
from services.records.app import create_app as create_records
from services.registry.app import create_app
from services.registry.importer import ResidentImporter
from services.registry.models import Coupon, Resident, ResidentHistory, outbox, shard_assignments
from services.registry.settings import RegistrySettings
from shared.auth import Role
from shared.db import Databases, utcnow
from shared.events import CouponEvent, coupon_events_from_bytes
from shared.migrations import SERVICES_DIR
from tests.factories import InternalHeaders, internal_headers
from tests.integration.services.records.records_support import serving_settings

TREES = SERVICES_DIR / "registry" / "migrations"
CHIYODA, SAPPORO = "131016", "011002"  # pinned to shards s0 and s1
SHARD_OF = {CHIYODA: "s0", SAPPORO: "s1"}
HEADER = "個別宛名番号,氏名,氏名カナ,生年月日,性別,個人番号,住所,券番号\n"


def auth(code: str = CHIYODA) -> InternalHeaders:
    return internal_headers(Role.MUNICIPALITY, municipality=code)


def database_maker(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., str]:
    """``make_database`` of a fixture parametrised ``sqlite`` (files under ``tmp_path``: the embedded stack) or
    ``postgresql`` (the harness's server)."""
    if request.param == "postgresql":
        make_database: Callable[..., str] = request.getfixturevalue("make_database")
        return make_database

    def make_sqlite(prefix: str = "test", tree: Path | None = None) -> str:
        if tree is not None:
            migrated: Callable[[Path, Path], str] = request.getfixturevalue("migrated_sqlite")
            return migrated(tmp_path / f"{prefix}.db", tree)
        return f"sqlite+aiosqlite:///{tmp_path / prefix}.db"

    return make_sqlite


@asynccontextmanager
async def records_over_http(records_dbs: Databases) -> AsyncIterator[str]:
    """records on these databases, served by uvicorn on a free port as registry reaches it in production (no
    relay, consumer or imports); its URL."""
    port = free_port()
    settings = serving_settings(records_dbs)
    server = uvicorn.Server(uvicorn.Config(create_records(settings), port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class Registry:
    app: FastAPI
    client: httpx.AsyncClient
    settings: RegistrySettings

    @property
    def databases(self) -> Databases:
        databases: Databases = self.app.state.databases
        return databases

    @property
    def importer(self) -> ResidentImporter:
        importer: ResidentImporter = self.app.state.importer
        return importer

    async def import_csv(self, data: bytes, *, code: str = CHIYODA) -> dict[str, Any]:
        """Post a file, wait for its import to end, return the final status."""
        r = await self.client.post(
            f"/api/v1/municipalities/{code}/resident-imports",
            content=data,
            headers=auth(code) | {"Content-Type": "text/csv"},
        )
        assert r.status_code == 202, r.text
        import_id = r.json()["import_id"]
        await self.importer.wait(import_id)
        status = await self.client.get(
            f"/api/v1/municipalities/{code}/resident-imports/{import_id}", headers=auth(code)
        )
        assert status.status_code == 200, status.text
        body: dict[str, Any] = status.json()
        return {"import_id": import_id} | body

    async def residents(self, code: str = CHIYODA) -> list[Resident]:
        async with self.databases.shards[SHARD_OF[code]].sessionmaker() as session:
            stmt = select(Resident).where(Resident.municipality_code == code).order_by(Resident.resident_id)
            return list((await session.execute(stmt)).scalars())

    async def coupons(self, code: str = CHIYODA) -> list[Coupon]:
        async with self.databases.shards[SHARD_OF[code]].sessionmaker() as session:
            stmt = select(Coupon).where(Coupon.municipality_code == code).order_by(Coupon.coupon_number)
            return list((await session.execute(stmt)).scalars())

    async def events(self, code: str = CHIYODA) -> list[CouponEvent]:
        async with self.databases.shards[SHARD_OF[code]].sessionmaker() as session:
            payloads = (await session.execute(select(outbox.c.payload).order_by(outbox.c.id))).scalars()
            return [e for p in payloads for e in coupon_events_from_bytes(p) if e.municipality == code]

    async def history(self, resident_id: str, code: str = CHIYODA) -> list[ResidentHistory]:
        async with self.databases.shards[SHARD_OF[code]].sessionmaker() as session:
            stmt = (
                select(ResidentHistory)
                .where(ResidentHistory.municipality_code == code, ResidentHistory.resident_id == resident_id)
                .order_by(ResidentHistory.version)
            )
            return list((await session.execute(stmt)).scalars())


async def migrated_registry(make_database: Callable[..., str], **overrides: Any) -> RegistrySettings:
    main = make_database("registry_main", TREES / "main")
    s0, s1 = make_database("registry_s0", TREES / "shard"), make_database("registry_s1", TREES / "shard")
    dbs = Databases.connect(main, {}, pool_size=1)
    async with dbs.main.sessionmaker() as session, session.begin():
        await session.execute(
            shard_assignments.insert(),
            [{"municipality_code": c, "shard": s, "assigned_at": utcnow()} for c, s in SHARD_OF.items()],
        )
    await dbs.dispose()
    # The outbox is inspected, not published: no relay.
    return RegistrySettings(main_dsn=main, shard_dsns={"s0": s0, "s1": s1}, pool_size=5, run_relay=False, **overrides)


async def serve(settings: RegistrySettings) -> AsyncGenerator[Registry, None]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://registry") as client,
    ):
        yield Registry(app, client, settings)
