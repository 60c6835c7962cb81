"""The audit database failing at the worst moments, on real PostgreSQL: a request is never executed without an
entry, and never reported failed after the service acted on it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from devtools.harness.postgres import PostgresServer
from services.gateway.audit import FileAnchorStore, verify_trail
from services.gateway.models import AuditEntry
from services.gateway.settings import GatewaySettings
from shared.auth import Role
from shared.db import Database
from shared.migrations import upgrade
from tests.integration.services.gateway.gateway_fakes import (
    KNOWN_RESIDENT,
    MIGRATIONS,
    FakeUpstream,
    Seen,
    fake_app,
    running_gateway,
    serve,
)

pytestmark = pytest.mark.postgres

Token = Callable[..., dict[str, str]]
CLINIC = "1312345678"
DOSE = {"coupon": "111310160000000001", "dose_number": 1}


@pytest.fixture
async def audit_database(make_database: Callable[..., str]) -> str:
    dsn = make_database("gwfault")
    await asyncio.to_thread(upgrade, dsn, MIGRATIONS)
    return dsn


@pytest.fixture
async def records() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream("records")
    async with serve(fake_app(fake)) as url:
        fake.url = url
        yield fake


async def entries(dsn: str, instance: str) -> list[tuple[int, int | None, int | None]]:
    database = Database.connect(dsn, pool_size=1)
    try:
        async with database.sessionmaker() as session:
            stmt = select(AuditEntry).where(AuditEntry.instance == instance).order_by(AuditEntry.seq)
            return [(e.seq, e.outcome, e.intent_seq) for e in (await session.execute(stmt)).scalars()]
    finally:
        await database.engine.dispose()


async def problems(dsn: str, key: str, anchors: Path) -> list[str]:
    database = Database.connect(dsn, pool_size=1)
    try:
        async with database.sessionmaker() as session:
            found, _ = await verify_trail(session, key.encode(), FileAnchorStore(anchors))
        return [str(p) for p in found]
    finally:
        await database.engine.dispose()


def set_connections(pg: PostgresServer, database: str, *, allowed: bool) -> None:
    """Take the database away (no new connections, every open one killed) or give it back."""
    pg.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')
    if not allowed:
        pg.execute(f"SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = '{database}'")


async def test_the_audit_database_lost_while_the_service_acts_does_not_turn_its_answer_into_a_failure(
    gateway_settings: Callable[..., GatewaySettings],
    audit_database: str,
    records: FakeUpstream,
    pg_server: PostgresServer,
    token: Token,
) -> None:
    name = audit_database.rsplit("/", 1)[1]
    settings = gateway_settings(main_dsn=audit_database, records_url=records.url, audit_timeout_seconds=2.0)

    async def audit_database_goes_away(seen: Seen) -> None:
        # Strictly after the gateway committed the intent, strictly before records answers.
        records.while_acting = None
        await asyncio.to_thread(set_connections, pg_server, name, allowed=False)

    records.while_acting = audit_database_goes_away
    clinic = {**token(Role.INSTITUTION, institution=CLINIC), "Idempotency-Key": "dose-1"}
    try:
        async with running_gateway(settings) as (app, client):
            acted = await client.post("/api/v1/doses", json=DOSE, headers=clinic)
            # records acted: the caller is told so (the old order answered 503 here, and a retry doubled).
            assert acted.status_code == 200
            assert acted.json()["upstream"] == "records"
            assert len(records.seen) == 1
            # Its outcome entry waits in the writer while the database is away...
            with pytest.raises(TimeoutError):
                await app.state.audit.flush(timeout=0.5)
            # ...and a new request cannot get its intent stored: refused before records sees it.
            refused = await client.post("/api/v1/doses", json=DOSE, headers={**clinic, "Idempotency-Key": "dose-2"})
            assert refused.status_code == 503
            assert refused.json()["detail"] == "the audit trail is unavailable; retry"
            assert len(records.seen) == 1

            await asyncio.to_thread(set_connections, pg_server, name, allowed=True)
            await app.state.audit.flush(timeout=15)
            again = await client.post("/api/v1/doses", json=DOSE, headers={**clinic, "Idempotency-Key": "dose-3"})
            assert again.status_code == 200
            await app.state.audit.flush(timeout=5)
    finally:
        await asyncio.to_thread(set_connections, pg_server, name, allowed=True)

    # The first dose: intent, then its outcome once the database was back; the refused one left nothing
    # (its intent was never stored); the third is whole again.
    assert await entries(audit_database, settings.instance_id) == [
        (1, None, None),
        (2, 200, 1),
        (3, None, None),
        (4, 200, 3),
    ]
    assert await problems(audit_database, settings.audit_key, settings.audit_anchor_dir) == []


async def test_a_slow_audit_database_delays_no_answer_and_refuses_what_it_cannot_record_in_time(
    gateway_settings: Callable[..., GatewaySettings],
    audit_database: str,
    records: FakeUpstream,
    token: Token,
) -> None:
    settings = gateway_settings(main_dsn=audit_database, records_url=records.url, audit_timeout_seconds=1.0)
    admin = Database.connect(audit_database, pool_size=1)
    locked: list[AsyncConnection] = []

    async def audit_table_locked(seen: Seen) -> None:
        records.while_acting = None
        conn = await admin.engine.connect()
        locked.append(conn)
        await conn.begin()
        await conn.execute(text("LOCK TABLE audit_trail IN ACCESS EXCLUSIVE MODE"))

    records.while_acting = audit_table_locked
    clinic = {**token(Role.INSTITUTION, institution=CLINIC), "Idempotency-Key": "dose-1"}
    try:
        async with running_gateway(settings) as (app, client):
            started = time.monotonic()
            acted = await client.post("/api/v1/doses", json=DOSE, headers=clinic)
            assert acted.status_code == 200
            assert time.monotonic() - started < 1.0  # not held back by the outcome entry's stalled write
            # The writer is stuck behind the lock with that outcome: the next intent cannot be stored in time.
            refused = await client.post("/api/v1/doses", json=DOSE, headers={**clinic, "Idempotency-Key": "dose-2"})
            assert refused.status_code == 503
            assert len(records.seen) == 1
            await locked[0].rollback()
            await app.state.audit.flush(timeout=10)
    finally:
        for conn in locked:
            await conn.close()
        await admin.engine.dispose()

    # The late intent is stored after all, so it is closed with the answer its caller got (503).
    assert await entries(audit_database, settings.instance_id) == [
        (1, None, None),
        (2, 200, 1),
        (3, None, None),
        (4, 503, 3),
    ]
    assert await problems(audit_database, settings.audit_key, settings.audit_anchor_dir) == []


async def test_a_read_the_trail_records_too_late_is_withheld_and_its_entry_corrected(
    gateway_settings: Callable[..., GatewaySettings],
    audit_database: str,
    token: Token,
) -> None:
    registry = FakeUpstream("registry")
    admin = Database.connect(audit_database, pool_size=1)
    async with serve(fake_app(registry)) as url:
        registry.url = url
        settings = gateway_settings(main_dsn=audit_database, registry_url=url, audit_timeout_seconds=1.0)
        read = f"/api/v1/municipalities/131016/residents/{KNOWN_RESIDENT}"
        municipality = token(Role.MUNICIPALITY, municipality="131016")
        try:
            async with running_gateway(settings) as (app, client):
                conn = await admin.engine.connect()
                await conn.begin()
                await conn.execute(text("LOCK TABLE audit_trail IN ACCESS EXCLUSIVE MODE"))
                try:
                    withheld = await client.get(read, headers=municipality)
                finally:
                    await conn.rollback()
                    await conn.close()
                # The service answered, but the answer waited for its entry and was dropped when that took too long.
                assert withheld.status_code == 503
                assert withheld.json()["detail"] == "the audit trail is unavailable; retry"
                assert "upstream" not in withheld.text
                assert len(registry.seen) == 1
                await app.state.audit.flush(timeout=10)
                answered = await client.get(read, headers=municipality)
                assert answered.status_code == 200 and answered.json()["upstream"] == "registry"
                await app.state.audit.flush(timeout=5)
        finally:
            await admin.engine.dispose()

    # The late entry (200: what the service said) is stored after all, so it is corrected with what the caller got.
    assert await entries(audit_database, settings.instance_id) == [
        (1, 200, None),
        (2, 503, 1),
        (3, 200, None),
    ]
    assert await problems(audit_database, settings.audit_key, settings.audit_anchor_dir) == []
