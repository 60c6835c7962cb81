"""``vrs shards move`` on real PostgreSQL, registry and records with two shards each: a municipality moves
from s0 to s1 while residents are written and doses recorded for it and for a municipality on the other
shard, through the services' apps; nothing is lost or doubled, the other municipality never waits, and an
interrupted move is finished by running it again."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from devtools.harness.postgres import PostgresServer
from devtools.tokens import bearer_headers
from services.gateway.settings import GatewaySettings
from services.records.app import create_app as create_records
from services.records.consumer import wait_caught_up
from services.records.models import Dose, IdempotencyKey
from services.records.models import shard_assignments as records_assignments
from services.records.models import shard_moves as records_moves
from services.records.repository import MOVABLE_TABLES as RECORDS_TABLES
from services.records.settings import RecordsSettings
from services.registry.models import Coupon, Resident, outbox, shard_assignments, shard_moves
from services.registry.repository import MOVABLE_TABLES as REGISTRY_TABLES
from shared import cli
from shared.auth import Role
from shared.db import Databases
from shared.events import CouponEvent
from shared.migrations import upgrade
from shared.outbox import OutboxRepository
from shared.settings import BusSettings
from shared.shardmove import (
    MOVE_LOCK_CLASS,
    MoveSpec,
    ShardMoveError,
    copy_and_flip,
    fence,
    move_lock,
    move_municipality,
    plan,
    precopy,
)
from tests.factories import internal_headers
from tests.integration.services.gateway.gateway_fakes import MIGRATIONS as GATEWAY_MIGRATIONS
from tests.integration.services.gateway.gateway_fakes import running_gateway
from tests.integration.services.gateway.gateway_fakes import serve as serve_http
from tests.integration.services.records.records_support import dose, records_databases, serving_settings
from tests.integration.services.registry.registry_support import CHIYODA, SAPPORO, Registry, migrated_registry, serve

pytestmark = pytest.mark.usefixtures("pg_server")
PERSON = {"name": "山田 花子", "name_kana": "ヤマダ ハナコ", "birth_date": "1950-04-02", "sex": "F"}
CLINIC = internal_headers(Role.INSTITUTION, institution="1312345678")


@dataclass
class Stack:
    registry: Registry
    records: httpx.AsyncClient
    records_dbs: Databases
    records_settings: RecordsSettings
    movers: list[MoveSpec] = field(default_factory=list)


@pytest.fixture
async def stack(make_database: Callable[..., str], tmp_path: Path) -> AsyncIterator[Stack]:
    bus = BusSettings(embedded_path=tmp_path / "log.db")
    async for records_dbs in records_databases(make_database):
        records_settings = serving_settings(records_dbs, bus=bus)
        app = create_records(records_settings)
        settings = await migrated_registry(make_database)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://records") as records,
        ):
            async for registry in serve(settings):
                # The mover's own connections, as `vrs shards move` in a process of its own would have.
                registry_dbs = Databases.connect(settings.main_dsn, settings.shard_dsns, pool_size=2)
                mover_records = Databases.connect(records_dbs.main.url, records_settings.shard_dsns, pool_size=2)
                movers = [
                    MoveSpec("registry", registry_dbs, REGISTRY_TABLES, shard_moves, shard_assignments),
                    MoveSpec(
                        "records",
                        mover_records,
                        RECORDS_TABLES,
                        records_moves,
                        records_assignments,
                        before_fence=functools.partial(wait_caught_up, records_settings, mover_records, timeout=5),
                    ),
                ]
                try:
                    yield Stack(registry, records, records_dbs, records_settings, movers)
                finally:
                    await registry_dbs.dispose()
                    await mover_records.dispose()


async def put_resident(stack: Stack, code: str, resident_id: str, coupon: str) -> httpx.Response:
    return await stack.registry.client.put(
        f"/api/v1/municipalities/{code}/residents/{resident_id}",
        json=PERSON | {"coupon_number": coupon},
        headers=internal_headers(Role.MUNICIPALITY, municipality=code),
    )


async def record_dose(stack: Stack, code: str, key: str, coupon: str) -> httpx.Response:
    body = dose(coupon, municipality=code).model_dump(mode="json")
    return await stack.records.post("/api/v1/doses", json=body, headers=CLINIC | {"Idempotency-Key": key})


async def rows(databases: Databases, shard: str, table: Any, code: str) -> int:
    column = table.c.municipality_code if "municipality_code" in table.c else table.c.key
    async with databases.shards[shard].sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(table).where(column == code)) or 0)


def writer(stack: Stack, kind: str, code: str) -> Callable[[int], Awaitable[httpx.Response]]:
    """The i-th write of a kind for a municipality: a resident with coupon i+1, or a dose on coupon i+1."""

    def send(i: int) -> Awaitable[httpx.Response]:
        if kind == "resident":
            return put_resident(stack, code, f"R{i:04d}", f"{i + 1:010d}")
        return record_dose(stack, code, f"{code}-k{i:04d}", f"{i + 1:010d}")

    return send


async def unpublished(databases: Databases, shard: str) -> list[bytes]:
    """What a relay would claim there now (and then lets go: the transaction is rolled back)."""
    async with databases.shards[shard].sessionmaker() as session:
        claimed = await OutboxRepository(session, outbox).claim_unpublished(100)
    return [bytes(row.payload) for row in claimed]


@dataclass
class Load:
    """Writes as a client makes them: on a 503 it waits the Retry-After and sends the same request again."""

    acknowledged: dict[str, list[str]] = field(default_factory=dict)  # kind:code → ids acknowledged
    refused: dict[str, int] = field(default_factory=dict)  # kind:code → 503s met
    longest_wait: dict[str, float] = field(default_factory=dict)  # kind:code → longest time to an answer

    async def run(
        self, kind: str, code: str, send: Callable[[int], Awaitable[httpx.Response]], stop: asyncio.Event
    ) -> None:
        name, i = f"{kind}:{code}", 0
        self.acknowledged[name], self.refused[name], self.longest_wait[name] = [], 0, 0.0
        while not stop.is_set():
            started = time.monotonic()
            while True:
                r = await send(i)
                if r.status_code != 503:
                    break
                assert r.headers["Retry-After"] == "1", r.text
                self.refused[name] += 1
                await asyncio.sleep(0.05)
            assert r.status_code in (200, 201), r.text
            self.longest_wait[name] = max(self.longest_wait[name], time.monotonic() - started)
            self.acknowledged[name].append(f"{i:04d}")
            i += 1


async def test_a_municipality_moves_to_another_shard_under_load_losing_and_doubling_nothing(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # Two municipalities on different shards, in both services.
    assert {c: await stack.registry.databases.shard_of(c) for c in (CHIYODA, SAPPORO)} == {CHIYODA: "s0", SAPPORO: "s1"}
    assert {c: await stack.records_dbs.shard_of(c) for c in (CHIYODA, SAPPORO)} == {CHIYODA: "s0", SAPPORO: "s1"}

    load, stop = Load(), asyncio.Event()
    writers = [
        asyncio.create_task(load.run(kind, code, writer(stack, kind, code), stop))
        for kind in ("resident", "dose")
        for code in (CHIYODA, SAPPORO)
    ]
    await asyncio.sleep(1.0)
    lines: list[str] = []
    with caplog.at_level(logging.INFO, logger="shared.shardmove"):
        moves = await move_municipality(stack.movers, CHIYODA, "s1", grace_seconds=2.5, progress=lines.append)
    caught_up = [r.getMessage() for r in caplog.records if r.getMessage().startswith("registry: residents of")]
    await asyncio.sleep(1.0)  # writes go on after the move, now to the new shard
    stop.set()
    await asyncio.gather(*writers)

    print("\n".join(lines))
    print({k: len(v) for k, v in load.acknowledged.items()}, "503s:", load.refused, "longest:", load.longest_wait)
    assert {m["state"] for m in moves.values()} == {"done"}
    for service in ("registry", "records"):
        assert moves[service]["pause_seconds"] < 5.0
    # The other municipality never noticed; the moving one was refused for a moment, then served again.
    assert load.refused[f"resident:{SAPPORO}"] == load.refused[f"dose:{SAPPORO}"] == 0
    assert load.refused[f"resident:{CHIYODA}"] > 0 or load.refused[f"dose:{CHIYODA}"] > 0
    for name, ids in load.acknowledged.items():
        assert len(ids) > 5, (name, ids)

    registry_dbs, records_dbs = stack.registry.databases, stack.records_dbs
    # Registry: every acknowledged resident exactly once, on s1 only; one coupon (and one event) each.
    residents = load.acknowledged[f"resident:{CHIYODA}"]
    async with registry_dbs.shards["s1"].sessionmaker() as session:
        stored = (
            await session.execute(select(Resident.resident_id).where(Resident.municipality_code == CHIYODA))
        ).scalars()
        assert sorted(stored) == [f"R{i}" for i in residents]
        payloads = (await session.execute(select(outbox.c.payload).order_by(outbox.c.id))).scalars()
        events = [e for e in map(CouponEvent.from_bytes, payloads) if e.municipality == CHIYODA]
    assert len(events) == len({e.event_id for e in events}) == len(residents)
    assert sorted(e.coupon_number for e in events) == [f"{int(i) + 1:010d}" for i in residents]
    for table in (Resident.__table__, Coupon.__table__, outbox):
        assert await rows(registry_dbs, "s0", table, CHIYODA) == 0
    assert await rows(registry_dbs, "s1", Coupon.__table__, CHIYODA) == len(residents)
    # The writes during the pre-copy were recorded on s0 and carried by key; the recording ended with the move.
    assert any("keys written since the pre-copy carried" in line for line in caught_up), caught_up
    async with registry_dbs.shards["s0"].sessionmaker() as session:
        for recorded in ("shard_captures", "shard_move_changes"):
            assert (await session.execute(text(f"SELECT count(*) FROM {recorded}"))).scalar_one() == 0, recorded

    # records: every acknowledged dose exactly once on s1, with its key; nothing left on s0.
    doses = load.acknowledged[f"dose:{CHIYODA}"]
    async with records_dbs.shards["s1"].sessionmaker() as session:
        coupons = (await session.execute(select(Dose.coupon_number).where(Dose.municipality_code == CHIYODA))).scalars()
        assert sorted(coupons) == [f"{int(i) + 1:010d}" for i in doses]
        keys = (
            await session.execute(select(IdempotencyKey.key).where(IdempotencyKey.key.like(f"{CHIYODA}-%")))
        ).scalars()
        assert sorted(keys) == [f"{CHIYODA}-k{i}" for i in doses]
    assert await rows(records_dbs, "s0", Dose.__table__, CHIYODA) == 0
    # A retried request (the same key) after the move replays its answer: no second dose.
    again = await record_dose(stack, CHIYODA, f"{CHIYODA}-k0000", f"{1:010d}")
    assert again.status_code == 201 and await rows(records_dbs, "s1", Dose.__table__, CHIYODA) == len(doses)
    # Reads come from the new shard.
    listed = await stack.records.get(
        f"/api/v1/municipalities/{CHIYODA}/doses?limit=1000",
        headers=internal_headers(Role.MUNICIPALITY, municipality=CHIYODA),
    )
    # (a quiet machine records more than the default page of 500 during the load; the page holds at most 1,000)
    assert listed.status_code == 200 and len(listed.json()["doses"]) == min(len(doses), 1000)
    assert await registry_dbs.shard_of(CHIYODA) == "s1"


async def test_an_interrupted_move_is_refused_writes_meanwhile_and_finishes_when_run_again(stack: Stack) -> None:
    for i in range(3):
        assert (await put_resident(stack, CHIYODA, f"R{i}", f"{i + 1:010d}")).status_code == 201
        assert (await record_dose(stack, CHIYODA, f"k{i}", f"{i + 1:010d}")).status_code == 201
    records_mover = stack.movers[1]
    # Interrupted after records flipped, before registry copied anything.
    moves = {s.service: await plan(s, CHIYODA, "s1") for s in stack.movers}
    for spec in stack.movers:
        move = moves[spec.service]
        assert move is not None
        await fence(spec, move)
    await copy_and_flip(records_mover, moves["records"])  # type: ignore[arg-type]
    # The relays leave a fenced municipality's events alone: they move, and are published from the new shard.
    assert await unpublished(stack.registry.databases, "s0") == []

    # Meanwhile the municipality's registry writes are refused (503), reads still served, others unaffected.
    refused = await put_resident(stack, CHIYODA, "R9", "0000000009")
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "being moved" in refused.json()["detail"]
    assert (await put_resident(stack, SAPPORO, "S1", "0000000001")).status_code == 201
    assert await rows(stack.registry.databases, "s0", Resident.__table__, CHIYODA) == 3
    # Another target for an unfinished move is refused.
    with pytest.raises(ShardMoveError, match="being moved to s1"):
        await move_municipality(stack.movers, CHIYODA, "s0")

    finished = await move_municipality(stack.movers, CHIYODA, "s1", grace_seconds=0.5)
    assert {m["state"] for m in finished.values()} == {"done"}
    assert await rows(stack.registry.databases, "s1", Resident.__table__, CHIYODA) == 3
    assert await rows(stack.registry.databases, "s0", Resident.__table__, CHIYODA) == 0
    assert await rows(stack.records_dbs, "s1", Dose.__table__, CHIYODA) == 3
    assert await rows(stack.records_dbs, "s0", Dose.__table__, CHIYODA) == 0
    # Its three coupon events wait on the new shard, once each, in their order.
    events = [CouponEvent.from_bytes(p) for p in await unpublished(stack.registry.databases, "s1")]
    mine = [e.coupon_number for e in events if e.municipality == CHIYODA]
    assert mine == [f"{i + 1:010d}" for i in range(3)]
    # The write refused during the move goes through now (the stale cached shard is forgotten on refusal).
    assert (await put_resident(stack, CHIYODA, "R9", "0000000009")).status_code == 201
    assert await rows(stack.registry.databases, "s1", Resident.__table__, CHIYODA) == 4
    # And moving back works the same way (the old fence on s0 is lifted when it becomes the target).
    back = await move_municipality(stack.movers, CHIYODA, "s0", grace_seconds=0.5)
    assert back["registry"]["rows"]["residents"] == 4 and back["records"]["rows"]["doses"] == 3
    async with stack.registry.databases.shards["s0"].sessionmaker() as session:
        assert (await session.execute(text("SELECT count(*) FROM shard_fences"))).scalar() == 0


async def test_vrs_shards_move_and_status_from_the_environment(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command an operator runs: settings from the environment, both services moved, the pause printed."""
    assert (await put_resident(stack, CHIYODA, "R1", "0000000001")).status_code == 201
    assert (await record_dose(stack, CHIYODA, "k1", "0000000001")).status_code == 201
    registry, records = stack.registry.settings, stack.records_settings
    monkeypatch.setenv("VRS_REGISTRY_MAIN_DSN", registry.main_dsn)
    monkeypatch.setenv("VRS_REGISTRY_SHARD_DSNS", json.dumps(registry.shard_dsns))
    monkeypatch.setenv("VRS_RECORDS_MAIN_DSN", records.main_dsn)
    monkeypatch.setenv("VRS_RECORDS_SHARD_DSNS", json.dumps(records.shard_dsns))
    monkeypatch.setenv("VRS_BUS_EMBEDDED_PATH", str(records.bus.embedded_path))

    assert await asyncio.to_thread(cli.main, ["shards", "move", "--municipality", CHIYODA, "--to", "s1"]) == 0
    out = capsys.readouterr().out
    assert f"registry: {CHIYODA} s0 → s1, write pause" in out and f"records: {CHIYODA} s0 → s1" in out
    assert await rows(stack.registry.databases, "s1", Resident.__table__, CHIYODA) == 1
    assert await rows(stack.records_dbs, "s1", Dose.__table__, CHIYODA) == 1
    # Again: nothing to do. An unknown shard: refused, nothing fenced.
    assert await asyncio.to_thread(cli.main, ["shards", "move", "--municipality", CHIYODA, "--to", "s1"]) == 0
    assert await asyncio.to_thread(cli.main, ["shards", "move", "--municipality", SAPPORO, "--to", "s9"]) == 1
    assert "no shard named 's9'" in capsys.readouterr().err
    assert (await put_resident(stack, SAPPORO, "S1", "0000000001")).status_code == 201
    assert await asyncio.to_thread(cli.main, ["shards", "status"]) == 0
    status = capsys.readouterr().out
    assert "registry s1=2" in status and "records s1=2" in status


async def test_a_copy_that_does_not_match_switches_nothing(stack: Stack) -> None:
    """A target that changes what it is given (here a trigger) fails the checksum: the map is not flipped."""
    assert (await put_resident(stack, CHIYODA, "R1", "0000000001")).status_code == 201
    async with stack.registry.databases.shards["s1"].sessionmaker() as session, session.begin():
        await session.execute(
            text(
                "CREATE FUNCTION garble() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN NEW.name := NEW.name || '?'; RETURN NEW; END $$"
            )
        )
        await session.execute(
            text("CREATE TRIGGER garble BEFORE INSERT ON residents FOR EACH ROW EXECUTE FUNCTION garble()")
        )
    with pytest.raises(ShardMoveError, match="residents of 131016 differs after the copy"):
        await move_municipality(stack.movers, CHIYODA, "s1")
    for mover in stack.movers:  # neither service switched: the failed copy stops both
        assert await mover.databases.current_shards([CHIYODA]) == {CHIYODA: "s0"}
    assert await rows(stack.registry.databases, "s1", Resident.__table__, CHIYODA) == 0  # rolled back
    # The pre-copy failed, before any fence on the source: the municipality is still served. The move is
    # resumable, not undone: once the target is repaired, running it again finishes, with what was written since.
    assert (await put_resident(stack, CHIYODA, "R2", "0000000002")).status_code == 201
    async with stack.registry.databases.shards["s1"].sessionmaker() as session, session.begin():
        await session.execute(text("DROP TRIGGER garble ON residents"))
    finished = await move_municipality(stack.movers, CHIYODA, "s1", grace_seconds=0.5)
    assert finished["registry"]["rows"]["residents"] == 2
    async with stack.registry.databases.shards["s1"].sessionmaker() as session:
        names = (await session.execute(select(Resident.name).where(Resident.municipality_code == CHIYODA))).scalars()
        assert list(names) == [PERSON["name"]] * 2


async def test_what_changes_between_the_pre_copy_and_the_fence_is_caught_up(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """The bulk is copied before the fence; a change, a new row and a deletion made after it are carried
    under the fence by the keys the source recorded meanwhile (no other row is read), and verified."""
    registry = stack.movers[0]
    for i in range(3):
        assert (await put_resident(stack, CHIYODA, f"R{i}", f"{i + 1:010d}")).status_code == 201
    move = await plan(registry, CHIYODA, "s1")
    assert move is not None
    assert await precopy(registry, move) == {"residents": 3, "coupons": 3, "resident_history": 3, "outbox": 3}
    assert await rows(stack.registry.databases, "s1", Resident.__table__, CHIYODA) == 3  # not served from there
    # Meanwhile, still served by s0: a change, a new resident, and a row gone.
    changed = PERSON | {"name": "山田 花", "coupon_number": "0000000001"}
    r = await stack.registry.client.put(
        f"/api/v1/municipalities/{CHIYODA}/residents/R0",
        json=changed,
        headers=internal_headers(Role.MUNICIPALITY, municipality=CHIYODA),
    )
    assert r.status_code == 200, r.text
    assert (await put_resident(stack, CHIYODA, "R3", "0000000004")).status_code == 201
    async with stack.registry.databases.shards["s0"].sessionmaker() as session, session.begin():
        await session.execute(text("DELETE FROM resident_history WHERE resident_id = 'R2'"))

    await fence(registry, move)
    with caplog.at_level(logging.INFO, logger="shared.shardmove"):
        await copy_and_flip(registry, move)
    caught_up = {
        r.getMessage().split(":")[1].split()[0]: r.getMessage() for r in caplog.records if "fence" in r.getMessage()
    }
    # Only the keys written meanwhile: R0 and R3; R3's coupon and its event; R0's and R3's history and R2's,
    # deleted there.
    assert "4 rows, 2 keys written since the pre-copy carried" in caught_up["residents"], caught_up
    assert "4 rows, 1 keys written since the pre-copy carried" in caught_up["coupons"], caught_up
    assert "4 rows, 1 keys written since the pre-copy carried" in caught_up["outbox"], caught_up
    assert "4 rows, 3 keys written since the pre-copy carried" in caught_up["resident_history"], caught_up
    assert move["rows"] == {"residents": 4, "coupons": 4, "resident_history": 4, "outbox": 4}  # a new name: no event
    async with stack.registry.databases.shards["s1"].sessionmaker() as session:
        names = dict(
            (
                await session.execute(
                    select(Resident.resident_id, Resident.name).where(Resident.municipality_code == CHIYODA)
                )
            ).all()
        )
        history = (await session.execute(text("SELECT resident_id, version FROM resident_history ORDER BY 1, 2"))).all()
    assert names == {"R0": "山田 花", "R1": PERSON["name"], "R2": PERSON["name"], "R3": PERSON["name"]}
    assert [tuple(h) for h in history] == [("R0", 1), ("R0", 2), ("R1", 1), ("R3", 1)]
    assert move["pause_seconds"] < 5.0


async def test_a_write_through_the_gateway_during_a_move_gets_503_and_retry_after(stack: Stack, tmp_path: Path) -> None:
    """What a caller sees: the gateway passes the fenced registry's 503 and its Retry-After on."""
    gateway_db = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    await asyncio.to_thread(upgrade, gateway_db, GATEWAY_MIGRATIONS)
    async with serve_http(stack.registry.app) as registry_url:
        settings = GatewaySettings(
            main_dsn=gateway_db, registry_url=registry_url, instance_id="gw-move", audit_anchor_dir=tmp_path / "anchors"
        )
        async with running_gateway(settings) as (_, gateway):
            caller = bearer_headers(Role.MUNICIPALITY, municipality=CHIYODA)
            url = f"/api/v1/municipalities/{CHIYODA}/residents/R1"
            assert (await gateway.put(url, json=PERSON, headers=caller)).status_code == 201
            registry = stack.movers[0]
            move = await plan(registry, CHIYODA, "s1")
            assert move is not None
            await precopy(registry, move)
            await fence(registry, move)
            refused = await gateway.put(url, json=PERSON | {"name": "山田 花"}, headers=caller)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
            assert refused.json()["error"] == "ServiceUnavailable"
            await copy_and_flip(registry, move)
            accepted = await gateway.put(url, json=PERSON | {"name": "山田 花"}, headers=caller)
            assert accepted.status_code == 200, accepted.text


async def test_a_second_run_of_a_move_is_refused_while_the_first_runs_and_works_once_it_ended(stack: Stack) -> None:
    """An operator who runs the move again because it looks hung: the second run stops at once, naming the
    municipality, and touches nothing (two runs would copy dose_history twice, or one's abort delete what the
    other verified); once the first run has ended, running it again works."""
    assert (await put_resident(stack, CHIYODA, "R1", "0000000001")).status_code == 201
    assert (await record_dose(stack, CHIYODA, "k1", "0000000001")).status_code == 201
    registry, records = stack.movers
    # The first run, held after registry's fence, just before records' own (as if its consumers lagged).
    entered, release = asyncio.Event(), asyncio.Event()

    async def held() -> None:
        entered.set()
        await release.wait()

    first = asyncio.create_task(
        move_municipality([registry, dataclasses.replace(records, before_fence=held)], CHIYODA, "s1", grace_seconds=0.5)
    )
    await asyncio.wait_for(entered.wait(), 30)
    states = {s.service: (await plan(s, CHIYODA, "s1") or {}).get("state") for s in stack.movers}
    assert states == {"registry": "fenced", "records": "fencing"}

    started = time.monotonic()
    with pytest.raises(ShardMoveError, match=f"a move of {CHIYODA} is already running"):
        await asyncio.wait_for(move_municipality(stack.movers, CHIYODA, "s1", grace_seconds=0.5), 30)
    assert time.monotonic() - started < 1.0
    assert {s.service: (await plan(s, CHIYODA, "s1") or {}).get("state") for s in stack.movers} == states

    release.set()
    assert {m["state"] for m in (await first).values()} == {"done"}
    assert await rows(stack.records_dbs, "s1", Dose.__table__, CHIYODA) == 1
    # The first run ended: its lock went with it, and a run for the municipality goes ahead.
    back = await move_municipality(stack.movers, CHIYODA, "s0", grace_seconds=0.5)
    assert back["registry"]["rows"]["residents"] == 1 and back["records"]["rows"]["doses"] == 1


async def test_a_killed_run_leaves_no_lock_behind_and_running_the_move_again_finishes_it(stack: Stack) -> None:
    """A run killed mid-move (here: fenced everywhere, nothing copied) loses its lock with its connections: the
    next run is not refused, and resumes the move as recorded."""
    assert (await put_resident(stack, CHIYODA, "R1", "0000000001")).status_code == 201
    assert (await record_dose(stack, CHIYODA, "k1", "0000000001")).status_code == 201
    async with move_lock(stack.movers, CHIYODA):
        for spec in stack.movers:
            move = await plan(spec, CHIYODA, "s1")
            assert move is not None
            await fence(spec, move)
        with pytest.raises(ShardMoveError, match=f"a move of {CHIYODA} is already running"):
            await move_municipality(stack.movers, CHIYODA, "s1")
        # Killed: the server ends its sessions (a process killed closes none of them itself). The timeout makes
        # pg_terminate_backend wait for each backend to exit, locks released, as a dead client's would have.
        for spec in stack.movers:
            async with spec.databases.main.engine.connect() as conn:
                ended = await conn.scalar(
                    text(
                        "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_locks "
                        "WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database "
                        "WHERE datname = current_database()) AND pid <> pg_backend_pid()"
                    )
                )
            assert ended == 1, spec.service
        finished = await move_municipality(stack.movers, CHIYODA, "s1", grace_seconds=0.5)
    assert {m["state"] for m in finished.values()} == {"done"}
    assert await rows(stack.registry.databases, "s1", Resident.__table__, CHIYODA) == 1
    assert await rows(stack.records_dbs, "s1", Dose.__table__, CHIYODA) == 1


async def test_a_run_that_loses_its_lock_stops_before_the_switch_and_finishes_when_run_again(
    stack: Stack, pg_server: PostgresServer
) -> None:
    """The lock's connection dropped while the run goes on (a restart, a network cut): a second run could start
    beside it, so the run stops at its next step instead of switching (or deleting) what it has not the lock
    for. It leaves the municipality fenced, as any interrupted move, and running it again finishes it."""
    assert (await put_resident(stack, CHIYODA, "R1", "0000000001")).status_code == 201
    assert (await record_dose(stack, CHIYODA, "k1", "0000000001")).status_code == 201

    def cut(message: str) -> None:
        if message.startswith("records: fenced"):  # every service fenced, the copies running
            ended = pg_server.execute(
                "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_locks WHERE locktype = 'advisory' "
                f"AND classid = {MOVE_LOCK_CLASS} AND objid = {int(CHIYODA)} AND objsubid = 2"
            )
            assert ended.strip() == "2"  # registry's and records' main databases

    with pytest.raises(ShardMoveError, match=f"lock on moving {CHIYODA} was lost.*stopped before the switch"):
        await move_municipality(stack.movers, CHIYODA, "s1", grace_seconds=0.5, progress=cut)
    for spec in stack.movers:
        async with spec.databases.main.sessionmaker() as session:
            state = await session.scalar(select(spec.moves.c.state).where(spec.moves.c.municipality_code == CHIYODA))
        assert state == "fenced", spec.service
    assert await rows(stack.registry.databases, "s0", Resident.__table__, CHIYODA) == 1
    assert (await put_resident(stack, CHIYODA, "R2", "0000000002")).status_code == 503  # fenced until run again
    finished = await move_municipality(stack.movers, CHIYODA, "s1", grace_seconds=0.5)
    assert {m["state"] for m in finished.values()} == {"done"}
    assert await rows(stack.registry.databases, "s1", Resident.__table__, CHIYODA) == 1
    assert await rows(stack.records_dbs, "s1", Dose.__table__, CHIYODA) == 1


async def test_a_lock_held_by_a_long_transaction_delays_other_writers_only_briefly_and_stops_the_move_clearly(
    stack: Stack,
) -> None:
    """The fence (and the start of the recording) lock the shard's tables against writes for a moment; a
    transaction already writing one of them (a relay publishing to a slow Kafka holds its claim open) makes that
    lock wait, and every writer of the shard queues behind a waiting lock. So the mover waits a short time per
    attempt, lets the queue through, and tries again until its deadline: other writers wait a fraction of a
    second at most; then the move stops, saying what it could not lock, and runs again once the shard is quiet."""
    assert (await put_resident(stack, CHIYODA, "R1", "0000000001")).status_code == 201
    registry = dataclasses.replace(stack.movers[0], lock_deadline_seconds=2.0)
    source = stack.registry.databases.shards["s0"]
    waits: list[float] = []
    async with source.engine.connect() as blocker:
        await blocker.execute(text("LOCK TABLE outbox IN ROW EXCLUSIVE MODE"))  # what an INSERT or UPDATE takes
        move = asyncio.create_task(move_municipality([registry], CHIYODA, "s1", grace_seconds=0.5))
        await asyncio.sleep(0.3)
        i = 2
        while not move.done():  # the municipality's own writes, and so any other of the shard
            started = time.monotonic()
            assert (await put_resident(stack, CHIYODA, f"R{i}", f"{i:010d}")).status_code == 201
            waits.append(time.monotonic() - started)
            i += 1
            await asyncio.sleep(0.02)
        with pytest.raises(ShardMoveError, match=r"could not lock outbox on s0 within 2s.*run the move again"):
            await move
        await blocker.commit()
    assert len(waits) > 10 and max(waits) < 0.6, waits
    # The shard is quiet again: the move resumes and finishes, with every write made meanwhile.
    finished = await move_municipality([registry], CHIYODA, "s1", grace_seconds=0.5)
    assert finished["registry"]["state"] == "done" and finished["registry"]["rows"]["residents"] == i - 1
    assert await rows(stack.registry.databases, "s1", Resident.__table__, CHIYODA) == i - 1
