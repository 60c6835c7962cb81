"""The audit trail: written for every personal-data access, never holding a My Number, and tamper-evident."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select, text, update

from services.gateway.audit import GENESIS_HASH, AuditFacts, AuditTrail, chain_hash, chain_head, verify_chain
from services.gateway.models import AuditEntry
from services.gateway.settings import GatewaySettings
from shared.auth import Role
from shared.db import Database, Databases
from shared.domain.codes import my_number_check_digit
from shared.migrations import upgrade
from tests.integration.services.gateway.gateway_fakes import KNOWN_RESIDENT, MIGRATIONS, FakeUpstream, running_gateway

Token = Callable[..., dict[str, str]]
CHIYODA, SAPPORO, CLINIC = "131016", "011002", "1312345678"
M = "/api/v1/municipalities"
MY_NUMBER = "98765432101" + str(my_number_check_digit("98765432101"))


async def entries_after(db: Database, seq: int) -> list[AuditEntry]:
    async with db.sessionmaker() as session:
        stmt = select(AuditEntry).where(AuditEntry.seq > seq).order_by(AuditEntry.seq)
        return list((await session.execute(stmt)).scalars())


async def last_seq(db: Database) -> int:
    async with db.sessionmaker() as session:
        return (await chain_head(session))[0]


async def test_personal_data_reads_are_audited_with_who_what_why_and_no_my_number(
    client: httpx.AsyncClient, gateway_db: Database, token: Token
) -> None:
    chiyoda = token(Role.MUNICIPALITY, municipality=CHIYODA)
    start = await last_seq(gateway_db)

    read = await client.get(
        f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}",
        headers=[
            *((k.encode(), v.encode()) for k, v in chiyoda.items()),
            (b"X-Access-Purpose", "接種記録の確認".encode()),
            (b"X-Request-ID", b"req-audit-1"),
        ],
    )
    lookup = await client.post(
        f"{M}/{CHIYODA}/transfer-lookups",
        json={"my_number": MY_NUMBER, "legal_basis": "my-number-act-19-16"},
        headers={**chiyoda, "X-Access-Purpose": "ignored: the body states the basis"},
    )
    # A My Number where an id or a purpose belongs is masked too.
    odd = await client.get(f"{M}/{CHIYODA}/residents/{MY_NUMBER}", headers={**chiyoda, "X-Access-Purpose": MY_NUMBER})
    stranger = await client.get(
        f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=token(Role.MUNICIPALITY, municipality=SAPPORO)
    )
    doses = await client.get(f"{M}/{CHIYODA}/doses?status=needs_review", headers=chiyoda)
    assert [r.status_code for r in (read, lookup, odd, stranger, doses)] == [200, 404, 404, 404, 200]

    entries = await entries_after(gateway_db, start)
    assert [(e.method, e.path_template, e.status) for e in entries] == [
        ("GET", f"{M}/{{code}}/residents/{{resident_id}}", 200),
        ("POST", f"{M}/{{code}}/transfer-lookups", 404),
        ("GET", f"{M}/{{code}}/residents/{{resident_id}}", 404),
        ("GET", f"{M}/{{code}}/residents/{{resident_id}}", 404),  # refused by the gateway, recorded all the same
        ("GET", f"{M}/{{code}}/doses", 200),
    ]
    first, second, third, fourth, fifth = entries
    assert (first.subject, first.role, first.municipality, first.institution) == (
        CHIYODA,
        "municipality",
        CHIYODA,
        None,
    )
    assert json.loads(first.resource_ids) == {"code": CHIYODA, "resident_id": KNOWN_RESIDENT}
    assert first.purpose == "接種記録の確認"
    assert first.request_id == "req-audit-1" == read.headers["x-request-id"]
    assert second.purpose == "my-number-act-19-16"
    assert json.loads(second.resource_ids) == {"code": CHIYODA}
    assert json.loads(third.resource_ids) == {"code": CHIYODA, "resident_id": "********" + MY_NUMBER[-4:]}
    assert third.purpose == "********" + MY_NUMBER[-4:]
    assert (fourth.subject, fourth.municipality) == (SAPPORO, SAPPORO)
    assert fourth.purpose == "administration"
    assert fifth.request_id == doses.headers["x-request-id"]

    # No My Number in any column of any row, whatever the spelling.
    async with gateway_db.sessionmaker() as session:
        rows = (await session.execute(text("SELECT * FROM audit_log"))).all()
        assert await verify_chain(session) is None
    dump = json.dumps([[str(v) for v in row] for row in rows], ensure_ascii=False)
    assert MY_NUMBER not in dump
    assert MY_NUMBER[:8] not in dump


async def test_other_requests_and_unauthenticated_attempts_leave_no_entry(
    client: httpx.AsyncClient, gateway_db: Database, token: Token
) -> None:
    start = await last_seq(gateway_db)
    clinic = token(Role.INSTITUTION, institution=CLINIC)
    chiyoda = token(Role.MUNICIPALITY, municipality=CHIYODA)
    await client.post("/api/v1/doses", json={"coupon": "x"}, headers=clinic)
    await client.post("/api/v1/doses/batch", json={"doses": []}, headers=clinic)
    await client.post(f"{M}/{CHIYODA}/resident-imports", content=b"a,b\r\n", headers=chiyoda)
    await client.get("/api/v1/stats/doses")
    await client.get(f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}")  # 401: nobody to record
    await client.get("/internal/v1/anything", headers=chiyoda)
    assert [(e.method, e.path_template, e.status) for e in await entries_after(gateway_db, start)] == []


async def test_an_answer_is_withheld_when_its_audit_entry_cannot_be_written(
    tmp_path: Path, upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    # A database without the audit table: every append fails.
    settings = GatewaySettings(
        main_dsn=f"sqlite+aiosqlite:///{tmp_path / 'unmigrated.db'}", registry_url=upstreams["registry"].url
    )
    async with running_gateway(settings) as (_, client):
        response = await client.get(
            f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=token(Role.MUNICIPALITY, municipality=CHIYODA)
        )
        assert response.status_code == 503
        assert response.json() == {"error": "ServiceUnavailable", "detail": "the audit log is unavailable"}
        # Refusals carry no data: they are answered even so.
        refused = await client.get(
            f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=token(Role.MUNICIPALITY, municipality=SAPPORO)
        )
        assert refused.status_code == 404


# --- the chain itself, on SQLite and on PostgreSQL ---


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def audit_dbs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Databases]:
    if request.param == "postgres":
        make_database: Callable[..., str] = request.getfixturevalue("make_database")
        dsn = make_database("gateway")
    else:
        dsn = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    await asyncio.to_thread(upgrade, dsn, MIGRATIONS)
    databases = Databases.connect(dsn, pool_size=5)
    try:
        yield databases
    finally:
        await databases.dispose()


def facts(n: int, **changes: Any) -> AuditFacts:
    base: dict[str, Any] = {
        "request_id": f"req-{n}",
        "subject": CHIYODA,
        "role": "municipality",
        "municipality": CHIYODA,
        "institution": None,
        "method": "GET",
        "path_template": f"{M}/{{code}}/residents/{{resident_id}}",
        "resource_ids": {"code": CHIYODA, "resident_id": f"r-{n}"},
        "purpose": "administration",
        "status": 200,
    }
    return AuditFacts(**{**base, **changes})


async def verify(databases: Databases) -> int | None:
    async with databases.main.sessionmaker() as session:
        return await verify_chain(session, page_size=3)  # small pages: the walk crosses page borders


async def execute(databases: Databases, statement: Any) -> None:
    async with databases.main.sessionmaker() as session, session.begin():
        await session.execute(statement)


async def test_entries_chain_onto_each_other(audit_dbs: Databases) -> None:
    trail = AuditTrail(audit_dbs)
    appended = [await trail.append(facts(n)) for n in range(1, 8)]
    assert [e.seq for e in appended] == list(range(1, 8))
    assert appended[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(appended):
        assert after.prev_hash == before.entry_hash
    stored = await entries_after(audit_dbs.main, 0)
    for entry in stored:
        fields = {c.name: getattr(entry, c.name) for c in AuditEntry.__table__.columns}
        assert entry.entry_hash == chain_hash(entry.prev_hash, fields)
    assert await verify(audit_dbs) is None
    async with audit_dbs.main.sessionmaker() as session:
        assert await chain_head(session) == (7, appended[-1].entry_hash)


async def test_an_empty_log_verifies(audit_dbs: Databases) -> None:
    assert await verify(audit_dbs) is None


async def test_a_new_process_continues_the_same_chain(audit_dbs: Databases) -> None:
    for n in range(3):
        await AuditTrail(audit_dbs).append(facts(n))
    assert await verify(audit_dbs) is None
    async with audit_dbs.main.sessionmaker() as session:
        assert (await chain_head(session))[0] == 3


async def test_concurrent_appends_form_one_chain(audit_dbs: Databases) -> None:
    trail = AuditTrail(audit_dbs)
    entries = await asyncio.gather(*(trail.append(facts(n)) for n in range(40)))
    assert sorted(e.seq for e in entries) == list(range(1, 41))
    assert await verify(audit_dbs) is None


async def test_two_writers_on_one_database_stay_one_chain(audit_dbs: Databases) -> None:
    # Two replicas: each caches the head, and the loser of a race re-reads it instead of forking.
    first, second = AuditTrail(audit_dbs), AuditTrail(audit_dbs)
    for n in range(6):
        await (first if n % 2 else second).append(facts(n))
    async with audit_dbs.main.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(AuditEntry)) == 6
    assert await verify(audit_dbs) is None


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("purpose", "consent"),
        ("status", 404),
        ("subject", SAPPORO),
        ("resource_ids", '{"code":"131016","resident_id":"r-other"}'),
        ("request_id", "req-forged"),
    ],
)
async def test_changing_any_field_of_a_row_is_detected_at_that_row(
    audit_dbs: Databases, column: str, value: Any
) -> None:
    trail = AuditTrail(audit_dbs)
    for n in range(1, 8):
        await trail.append(facts(n))
    await execute(audit_dbs, update(AuditEntry).where(AuditEntry.seq == 5).values({column: value}))
    assert await verify(audit_dbs) == 5


async def test_a_rehashed_forgery_is_detected_at_the_next_row(audit_dbs: Databases) -> None:
    trail = AuditTrail(audit_dbs)
    for n in range(1, 8):
        await trail.append(facts(n))
    forged = (await entries_after(audit_dbs.main, 3))[0]
    fields = {c.name: getattr(forged, c.name) for c in AuditEntry.__table__.columns}
    fields["purpose"] = "consent"
    await execute(
        audit_dbs,
        update(AuditEntry)
        .where(AuditEntry.seq == 4)
        .values(purpose="consent", entry_hash=chain_hash(forged.prev_hash, fields)),
    )
    assert await verify(audit_dbs) == 5


async def test_a_removed_row_is_detected_where_it_was(audit_dbs: Databases) -> None:
    trail = AuditTrail(audit_dbs)
    for n in range(1, 8):
        await trail.append(facts(n))
    await execute(audit_dbs, delete(AuditEntry).where(AuditEntry.seq == 3))
    assert await verify(audit_dbs) == 3
    await execute(audit_dbs, delete(AuditEntry).where(AuditEntry.seq == 1))
    assert await verify(audit_dbs) == 1


async def test_the_chain_stays_valid_when_an_append_fails_midway(
    audit_dbs: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    trail = AuditTrail(audit_dbs)
    await trail.append(facts(1))

    async def broken_commit(self: object) -> None:
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr("shared.db.UnitOfWork.commit", broken_commit)
        with pytest.raises(RuntimeError):
            await trail.append(facts(2))
    await trail.append(facts(3))
    assert [e.request_id for e in await entries_after(audit_dbs.main, 0)] == ["req-1", "req-3"]
    assert await verify(audit_dbs) is None
