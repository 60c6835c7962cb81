"""The audit trail's retention (services/gateway/housekeeping.py): entries past their years are cut from the front of
each chain, the trail still verifies from each cut, a chain goes on after its cut, nobody without the key can move
a cut, and of several replicas one cuts at a time. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Table, delete, text, update

from services.gateway import cli as gateway_cli
from services.gateway.audit import AuditChainBroken, FileAnchorStore, utc_text
from services.gateway.housekeeping import AUDIT_ENTRIES_PURGED, BATCH_ROWS, PURGE_LOCK, purge_audit
from services.gateway.models import AuditCut
from services.gateway.repository import CHAINS, AuditRepository, entries_through, last_recorded_before
from services.gateway.settings import GatewaySettings
from shared.db import Databases, utcnow
from shared.domain.period import kept_since
from tests.factories import explained, run_sql, vrs_command
from tests.integration.services.gateway.audit_support import KEY, TABLE, execute, facts, problems_of, rows, trail
from tests.integration.services.gateway.gateway_fakes import MIGRATIONS, running_gateway

CUTS: Table = AuditCut.__table__  # type: ignore[assignment]
YEARS = 7
LONG_AGO = timedelta(days=3000)  # past any seven years


async def write(databases: Databases, anchors: FileAnchorStore, instance: str, count: int) -> None:
    async with trail(databases, anchors, instance) as writer:
        for n in range(count):
            await writer.append(facts(n))


async def recorded_at(databases: Databases, instance: str, at: dict[int, datetime]) -> None:
    """Back-date entries of ``instance``: seq → when it was recorded (its MAC covers the time, so verification
    would see the change: tests that verify afterwards back-date only what the purge then deletes)."""
    for seq, moment in at.items():
        await execute(
            databases, update(TABLE).where(TABLE.c.instance == instance, TABLE.c.seq == seq).values(recorded_at=moment)
        )


async def seqs(databases: Databases, instance: str) -> list[int]:
    return [e.seq for e in await rows(databases.main, instance)]


async def cuts(databases: Databases) -> dict[str, int]:
    async with databases.main.sessionmaker() as session:
        return {c["instance"]: c["seq"] for c in await AuditRepository(session).cuts()}


async def test_entries_past_their_years_are_cut_from_the_front_and_every_chain_still_verifies(
    audit_dbs: Databases, anchors: FileAnchorStore
) -> None:
    databases = audit_dbs
    await write(databases, anchors, "gw-a", 6)
    await write(databases, anchors, "gw-b", 4)
    await write(databases, anchors, "gw-c", 2)
    old = utcnow() - LONG_AGO
    await recorded_at(databases, "gw-a", {1: old, 2: old, 3: old})
    await recorded_at(databases, "gw-b", {seq: old for seq in range(1, 5)})
    before = AUDIT_ENTRIES_PURGED._value.get()

    # Two entries a batch: every batch is its own transaction with its cut, until one comes back short.
    done = await purge_audit(databases, KEY, before=kept_since(utcnow(), YEARS), batch_rows=2)
    assert (done.entries, done.chains, done.elsewhere, done.refused) == (7, ["gw-a", "gw-b"], False, [])
    assert AUDIT_ENTRIES_PURGED._value.get() - before == 7
    assert [await seqs(databases, i) for i in ("gw-a", "gw-b", "gw-c")] == [[4, 5, 6], [], [1, 2]]
    assert await cuts(databases) == {"gw-a": 3, "gw-b": 4}
    assert await problems_of(databases, anchors) == []
    async with databases.main.sessionmaker() as session:
        assert (await AuditRepository(session).instances()) == ["gw-a", "gw-b", "gw-c"]
    assert (await purge_audit(databases, KEY, before=kept_since(utcnow(), YEARS))).entries == 0

    # Both chains go on where they were: gw-b from its cut, every entry of it deleted.
    await write(databases, anchors, "gw-a", 1)
    await write(databases, anchors, "gw-b", 1)
    assert [await seqs(databases, i) for i in ("gw-a", "gw-b")] == [[4, 5, 6, 7], [5]]
    assert await problems_of(databases, anchors) == []


async def test_an_entry_goes_once_older_than_the_japanese_day_its_years_began(
    audit_dbs: Databases, anchors: FileAnchorStore
) -> None:
    databases = audit_dbs
    await write(databases, anchors, "gw-a", 4)
    since = kept_since(utcnow(), YEARS)
    await recorded_at(databases, "gw-a", {1: since - timedelta(days=400), 2: since - timedelta(microseconds=1)})
    await recorded_at(databases, "gw-a", {3: since})
    done = await purge_audit(databases, KEY, before=since)
    assert (done.entries, await seqs(databases, "gw-a")) == (2, [3, 4])
    assert await cuts(databases) == {"gw-a": 2}


async def test_a_cut_is_checked_and_nobody_without_the_key_can_move_it(
    audit_dbs: Databases, anchors: FileAnchorStore
) -> None:
    databases = audit_dbs
    await write(databases, anchors, "gw-a", 6)
    old = utcnow() - LONG_AGO
    await recorded_at(databases, "gw-a", {1: old, 2: old})
    await purge_audit(databases, KEY, before=kept_since(utcnow(), YEARS))
    async with databases.main.sessionmaker() as session:
        first_cut = dict(await AuditRepository(session).cut("gw-a") or {})
    await recorded_at(databases, "gw-a", {3: old})
    await purge_audit(databases, KEY, before=kept_since(utcnow(), YEARS))
    assert await cuts(databases) == {"gw-a": 3} and await problems_of(databases, anchors) == []

    # Whoever administers the database puts the earlier cut back, to hide that entry 3 is gone ...
    await execute(databases, update(CUTS).values(first_cut))
    assert await problems_of(databases, anchors) == ["chain gw-a: entry missing at seq 3"]
    # ... or moves it on over an entry deleted within its years ...
    [fourth] = [e for e in await rows(databases.main, "gw-a") if e.seq == 4]
    await execute(databases, delete(TABLE).where(TABLE.c.seq == 4))
    await execute(databases, update(CUTS).values(seq=4, mac=fourth.mac))
    assert await problems_of(databases, anchors) == ["chain gw-a: cut changed (MAC does not match) at seq 4"]
    # ... which no purge then covers with a cut of its own.
    done = await purge_audit(databases, KEY, before=utcnow() + timedelta(days=1))
    assert (done.entries, done.refused, await seqs(databases, "gw-a")) == (0, ["gw-a"], [5, 6])
    # ... or deletes the cut with what it stood for: the chain no longer starts where chains start.
    await execute(databases, delete(CUTS))
    assert await problems_of(databases, anchors) == ["chain gw-a: entry missing at seq 1"]


async def test_a_writer_does_not_go_on_from_a_changed_cut(audit_dbs: Databases, anchors: FileAnchorStore) -> None:
    databases = audit_dbs
    await write(databases, anchors, "gw-a", 3)
    await recorded_at(databases, "gw-a", {seq: utcnow() - LONG_AGO for seq in (1, 2, 3)})
    await purge_audit(databases, KEY, before=kept_since(utcnow(), YEARS))
    assert await seqs(databases, "gw-a") == [] and await cuts(databases) == {"gw-a": 3}
    await execute(databases, update(CUTS).values(seq=2))
    with pytest.raises(AuditChainBroken):
        async with trail(databases, anchors, "gw-a"):
            pass


@pytest.mark.postgres
async def test_of_two_replicas_one_cuts_at_a_time(make_database: Callable[..., str], anchors: FileAnchorStore) -> None:
    """On PostgreSQL (SQLite is one process: there is no other replica)."""
    databases = Databases.connect(make_database("gateway", MIGRATIONS), pool_size=2)
    await write(databases, anchors, "gw-a", 2)
    await recorded_at(databases, "gw-a", {1: utcnow() - LONG_AGO})
    async with databases.main.sessionmaker() as session, session.begin():
        # Another replica's pass is under way.
        assert await session.scalar(text("SELECT pg_try_advisory_xact_lock(:lock)"), {"lock": PURGE_LOCK})
        done = await purge_audit(databases, KEY, before=kept_since(utcnow(), YEARS))
        assert (done.entries, done.elsewhere) == (0, True)
    done = await purge_audit(databases, KEY, before=kept_since(utcnow(), YEARS))
    assert (done.entries, done.elsewhere) == (1, False)
    await databases.dispose()


async def test_the_gateway_cuts_in_the_background(
    audit_dbs: Databases, anchors: FileAnchorStore, gateway_settings: Callable[..., GatewaySettings]
) -> None:
    databases = audit_dbs
    await write(databases, anchors, "gw-old", 3)
    await recorded_at(databases, "gw-old", {1: utcnow() - LONG_AGO})
    settings = gateway_settings(
        main_dsn=databases.main.url,
        audit_key=KEY.decode(),
        audit_anchor_dir=anchors.directory,
        audit_purge_seconds=0.05,
    )
    async with running_gateway(settings):
        for _ in range(200):
            if await seqs(databases, "gw-old") == [2, 3]:
                break
            await asyncio.sleep(0.05)
    assert await seqs(databases, "gw-old") == [2, 3]
    assert await problems_of(databases, anchors) == []


async def test_vrs_audit_purge_once_and_verify(
    audit_dbs: Databases,
    anchors: FileAnchorStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The commands an operator runs (the purge also as a worker of its own, with the API replicas' interval 0)."""
    databases = audit_dbs
    await write(databases, anchors, "gw-a", 3)
    await recorded_at(databases, "gw-a", {1: utcnow() - LONG_AGO})
    env = {
        "VRS_GATEWAY_MAIN_DSN": databases.main.url,
        "VRS_GATEWAY_AUDIT_KEY": KEY.decode(),
        "VRS_GATEWAY_AUDIT_ANCHOR_DIR": str(anchors.directory),
    }
    out = await vrs_command("audit", "purge", "--once", env=env)
    assert out.startswith("deleted 1 audit entries older than ")
    assert out.endswith(" (7 years) from 1 chains\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert await gateway_cli.verify_configured() == 0
    assert capsys.readouterr().out.splitlines() == [
        "audit trail intact: 2 entries",
        f"1 chains checked from where retention cut them (the latest cut: entries before "
        f"{utc_text((await cut_row(databases))['kept_since'])})",
    ]


async def cut_row(databases: Databases) -> dict[str, Any]:
    async with databases.main.sessionmaker() as session:
        return dict((await AuditRepository(session).cuts())[0])


@pytest.mark.postgres
async def test_a_pass_reads_a_range_of_the_primary_key_never_the_whole_trail(
    make_database: Callable[..., str],
) -> None:
    """The statements a pass runs, on a trail of many entries: the chains found by one probe each, a batch's last
    entry and its deletion by a range of the primary key."""
    databases = Databases.connect(make_database("gateway", MIGRATIONS), pool_size=2)
    await run_sql(
        databases.main,
        "INSERT INTO audit_trail (instance, seq, recorded_at, request_id, principal, role, action, resource,"
        " legal_basis, outcome, prev_mac, mac) "
        "SELECT 'gw-' || (n % 4), n / 4 + 1, now() - interval '3000 days' + n * interval '1 minute', 'r', 'p',"
        " 'municipality', 'a', 'r', 'administration', 200, '0', '0' FROM generate_series(0, 199999) AS n",
    )
    async with databases.main.sessionmaker() as session:
        repo = AuditRepository(session)
        assert await repo.instances() == ["gw-0", "gw-1", "gw-2", "gw-3"]
    plan = await explained(databases.main, "audit_trail", CHAINS)
    assert "Seq Scan on audit_trail" not in plan and "audit_trail_pkey" in plan, plan
    # The oldest 5 % of a chain past its years: a pass's usual share.
    before = utcnow() - timedelta(days=3000) + timedelta(minutes=10_000)
    for statement in (
        last_recorded_before("gw-1", after_seq=1000, limit=BATCH_ROWS, before=before),
        entries_through("gw-1", after_seq=1000, seq=1000 + BATCH_ROWS),
    ):
        plan = await explained(databases.main, "audit_trail", statement)
        assert "Seq Scan" not in plan and "audit_trail_pkey" in plan, plan
    await databases.dispose()
