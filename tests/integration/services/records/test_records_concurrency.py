"""Two tablets recording the same dose of one coupon at the same moment, under different keys, on real
PostgreSQL: the per-coupon lock (taken before the doses on file are read) lets at most one be ``recorded``.
And a dose recorded while its coupon's event is applied follows the coupon's new holder, whichever is first."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import date
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from services.records.repository import (
    _RECORD_PG,
    DoseRepository,
    DoseWrite,
    _write_args,
    claim_rows,
    statements_of,
    write_together,
)
from services.records.schemas import CorrectionIn
from services.records.service import Submission, apply_coupon_events
from shared.auth import Principal, Role
from shared.db import Databases, utcnow
from shared.domain.sex import Sex
from shared.errors import ServiceUnavailable
from shared.events import CouponEvent, CouponEventType, CouponState, DoseEventType
from shared.shardmove import fenced_municipality
from tests.integration.services.records.records_support import (
    CHIYODA,
    CLINIC,
    SAPPORO,
    correct,
    count,
    dose,
    doses_in,
    events_in,
)

pytestmark = pytest.mark.usefixtures("pg_server")
Record = Callable[..., Any]
ROUNDS = 15
OTHER_CLINIC = Principal(role=Role.INSTITUTION, subject="tablet-9", institution="1319999999")


async def registered(databases: Databases, numbers: list[str]) -> None:
    await registered_by(databases, issued(numbers))


async def registered_by(databases: Databases, events: list[CouponEvent]) -> None:
    async with databases.shards["s0"].sessionmaker() as session, session.begin():
        await apply_coupon_events(session, events)


@pytest.mark.parametrize(
    ("second", "loser"),
    [
        ({}, "duplicate"),  # the same dose scanned at two desks
        ({"vaccinated_on": date(2021, 6, 2), "lot_number": "FA5765"}, "needs_review"),  # dose 1 twice
    ],
)
async def test_the_same_dose_under_two_keys_at_once_is_recorded_once(
    record: Record, databases: Databases, second: dict[str, Any], loser: str
) -> None:
    numbers = [f"{n:010d}" for n in range(1, ROUNDS + 1)]
    await registered(databases, numbers)
    # Two callers, so that nothing but the coupon is shared: not the key, not the caller's claims.
    pairs = [
        (
            record(Submission(key=f"a-{n}", dose=dose(n))),
            record(Submission(key=f"b-{n}", dose=dose(n, **second)), principal=OTHER_CLINIC),
        )
        for n in numbers
    ]
    results = await asyncio.gather(*(asyncio.gather(a, b) for a, b in pairs))
    for [a], [b] in results:
        assert a.accepted is not None and b.accepted is not None
        assert sorted([a.accepted.status, b.accepted.status]) == sorted(["recorded", loser])
    statuses = Counter(o.accepted.status for pair in results for [o] in pair if o.accepted)
    assert statuses == {"recorded": ROUNDS, loser: ROUNDS}
    stored = ROUNDS if loser == "duplicate" else 2 * ROUNDS
    assert await count(databases, "s0") == stored
    assert len(await events_in(databases, "s0")) == stored


def issued(numbers: list[str]) -> list[CouponEvent]:
    return [
        CouponEvent(
            type=CouponEventType.ISSUED,
            municipality=CHIYODA,
            coupon_number=n,
            version=1,
            state=CouponState(resident_id=f"R{n}", sex=Sex("F"), birth_date=date(1960, 1, 1)),
        )
        for n in numbers
    ]


async def assert_recorded_in_the_holders_cell(databases: Databases) -> None:
    [stored] = await doses_in(databases, "s0")
    assert (stored.status, stored.resident_id, stored.sex) == ("recorded", "R0000000001", "F")
    [recorded] = await events_in(databases, "s0")  # counted once, in the holder's cell
    assert recorded.type is DoseEventType.RECORDED
    assert recorded.cell is not None and recorded.cell.sex == "F"


async def test_a_holder_learned_between_the_read_and_the_write_is_the_new_doses_holder(
    record: Record, databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dose path read the coupon before its holder was known; the coupon's event is applied (and finds no
    dose to match) before the write: the write's check finds the holder changed, and the dose is decided again
    with it — not left ``unmatched`` with nothing that would ever match it."""
    original = DoseRepository.record
    events = issued(["0000000001"])

    async def event_first(self: DoseRepository, *args: Any, **kwargs: Any) -> bool:
        if events:
            await registered_by(databases, [events.pop()])
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(DoseRepository, "record", event_first)
    [out] = await record(Submission(key="k", dose=dose("0000000001")))
    assert out.accepted is not None and out.accepted.status == "recorded"
    await assert_recorded_in_the_holders_cell(databases)


async def test_a_dose_written_while_its_coupons_event_is_applied_waits_and_follows_the_new_holder(
    record: Record, databases: Databases
) -> None:
    """The coupon's event is being applied (its transaction has read the coupon's doses: none) when a tablet
    records a dose: the write waits for that transaction's coupon lock, then finds the holder changed, and the
    dose is decided again with it."""
    async with databases.shards["s0"].sessionmaker() as session, session.begin():
        assert await apply_coupon_events(session, issued(["0000000001"])) == 1
        recording = asyncio.create_task(record(Submission(key="k", dose=dose("0000000001"))))
        await asyncio.sleep(0.5)
        assert not recording.done(), "the write did not wait for the coupon event's transaction"
    [out] = await recording
    assert out.accepted is not None and out.accepted.status == "recorded"
    await assert_recorded_in_the_holders_cell(databases)


def refused(decided: str) -> float:
    sample = REGISTRY.get_sample_value("vrs_records_dose_writes_refused_total", {"shard": "s0", "decided": decided})
    return sample or 0.0


async def test_a_request_whose_coupons_keep_changing_decides_under_their_locks(
    record: Record, databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coupon-event backlog can change a request's coupon between each of its reads and writes, one bounded
    transaction after another (make soak: a batch refused ten times, answered 503). After a few refused writes
    the request reads and decides holding its coupons' locks, and is answered with the holder as it is then."""
    original = DoseRepository.record
    changes: list[CouponEvent] = []

    async def holder_changed_first(self: DoseRepository, *args: Any, **kwargs: Any) -> bool:
        if self._lease is not None:  # an optimistic write (the locked path's runs in a session of its own)
            version = len(changes) + 1
            state = CouponState(
                resident_id="R0000000001", sex=Sex("M" if version % 2 else "F"), birth_date=date(1960, 1, 1)
            )
            changes.append(
                CouponEvent(
                    type=CouponEventType.ISSUED if version == 1 else CouponEventType.HOLDER_CHANGED,
                    municipality=CHIYODA,
                    coupon_number="0000000001",
                    version=version,
                    state=state,
                )
            )
            await registered_by(databases, changes[-1:])
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(DoseRepository, "record", holder_changed_first)
    before = refused("on_a_read"), refused("under_locks")
    [out] = await record(Submission(key="k", dose=dose("0000000001")))
    assert len(changes) == 3  # three optimistic writes refused, then one under the lock
    assert (refused("on_a_read"), refused("under_locks")) == (before[0] + 3, before[1])  # on records' /metrics
    assert out.accepted is not None and out.accepted.status == "recorded"
    [stored] = await doses_in(databases, "s0")
    assert (stored.resident_id, stored.sex) == ("R0000000001", "M")  # version 3's holder
    [recorded] = await events_in(databases, "s0")
    assert recorded.type is DoseEventType.RECORDED and recorded.cell is not None and recorded.cell.sex == "M"


async def test_a_request_refused_even_under_its_coupons_locks_is_answered_503_logged_and_counted(
    record: Record, databases: Databases, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Should the write under the locks be refused too (nothing the dose path knows of changes a coupon without
    its lock), the caller is told to try again, nothing is stored, and an operator can see it happened."""

    async def always_refused(self: DoseRepository, *args: Any, **kwargs: Any) -> bool:
        return False

    monkeypatch.setattr(DoseRepository, "record", always_refused)
    before = refused("on_a_read"), refused("under_locks")
    with pytest.raises(ServiceUnavailable):
        await record(Submission(key="k", dose=dose("0000000001")))
    assert (refused("on_a_read"), refused("under_locks")) == (before[0] + 3, before[1] + 1)
    assert "refused 3 times and once under the coupons' locks: answered 503" in caplog.text
    assert await count(databases, "s0") == 0


async def test_a_correction_waits_for_a_dose_decided_under_its_coupons_lock(
    record: Record, databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that decides under its coupon's lock (after refused writes, see above) is not refused again by
    the municipality voiding a sibling dose between its read and its write (make soak: a batch answered 503
    under the lock): the correction takes the coupon's lock too, waits, and then finds the new dose on file."""
    await registered(databases, ["0000000001"])
    [first] = await record(Submission(key="first", dose=dose("0000000001")))
    assert first.accepted is not None
    voiding: list[asyncio.Task[None]] = []
    original = DoseRepository.record

    async def contended(self: DoseRepository, *args: Any, **kwargs: Any) -> bool:
        if self._lease is not None:  # an optimistic write: lost to another request on the coupon
            return False
        void = CorrectionIn(void=True, reason="recorded on the wrong coupon")
        voiding.append(asyncio.create_task(correct(databases, first.accepted.dose_id, void)))
        await asyncio.sleep(0.5)  # time enough to commit, if it did not wait
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(DoseRepository, "record", contended)
    [second] = await record(
        Submission(key="second", dose=dose("0000000001", dose_number=2, vaccinated_on=date(2021, 6, 22)))
    )
    assert second.accepted is not None and second.accepted.status == "recorded"
    await voiding[0]
    stored = {d.dose_id: d for d in await doses_in(databases, "s0")}
    assert stored[first.accepted.dose_id].voided and not stored[second.accepted.dose_id].voided


async def test_a_dose_whose_sibling_is_corrected_between_the_read_and_the_write_is_decided_again(
    record: Record, databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dose 2 is decided on dose 1 as read (three weeks before: recorded); the municipality corrects dose 1's
    date to twelve days before dose 2 before dose 2 is written. The write's check sees dose 1's version changed,
    and dose 2 is decided again on dose 1 as it is now: too early, ``needs_review`` — not stored on a view of
    dose 1 that no longer holds."""
    await registered(databases, ["0000000001"])
    [first] = await record(Submission(key="first", dose=dose("0000000001")))
    assert first.accepted is not None
    corrections: list[str] = []
    original = DoseRepository.record

    async def corrected_first(self: DoseRepository, *args: Any, **kwargs: Any) -> bool:
        if not corrections:
            corrections.append(first.accepted.dose_id)
            moved = CorrectionIn(changes={"vaccinated_on": "2021-06-10"}, reason="date mistyped")
            await correct(databases, first.accepted.dose_id, moved)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(DoseRepository, "record", corrected_first)
    second_dose = dose("0000000001", dose_number=2, vaccinated_on=date(2021, 6, 22), lot_number="FA5765")
    [second] = await record(Submission(key="second", dose=second_dose))
    assert corrections
    assert second.accepted is not None and second.accepted.status == "needs_review"
    assert [f.code for f in second.accepted.findings] == ["interval_too_short"]


async def test_a_write_decided_on_a_stale_read_stores_nothing(record: Record, databases: Databases) -> None:
    """The write checks, under the coupon's lock, that the doses on file are still those the rules saw: a
    dose recorded in between makes it store nothing (the service then reads and decides again)."""
    [first] = await record(Submission(key="first", dose=dose("0000000001")))
    assert first.accepted is not None
    answer = {
        "scope": CLINIC.scope_key, "key": "late", "request_hash": "h", "dose_id": first.accepted.dose_id,
        "response": {"dose_id": first.accepted.dose_id, "status": "duplicate", "findings": []}, "created_at": utcnow(),
    }  # fmt: skip
    coupon = [(CHIYODA, "0000000001")]
    async with databases.shards["s0"].sessionmaker() as session:
        repo = DoseRepository(session)
        stale = await repo.record(
            [answer], [], [], scope=CLINIC.scope_key, coupons=coupon, versions=[0], seen=[], seen_versions=[]
        )
        await session.commit()
    async with databases.shards["s0"].sessionmaker() as session:
        repo = DoseRepository(session)
        assert not stale
        assert (await repo.on_file(CLINIC.scope_key, ["late"], coupon))[0] == {}  # the answer was not stored
        current = await repo.record(
            [answer], [], [], scope=CLINIC.scope_key, coupons=coupon, versions=[0], seen=[first.accepted.dose_id],
            seen_versions=[1],
        )  # fmt: skip
        await session.commit()
        assert current
        assert "late" in (await repo.on_file(CLINIC.scope_key, ["late"], coupon))[0]


CALLERS = [CLINIC, OTHER_CLINIC, Principal(role=Role.INSTITUTION, subject="tablet-3", institution="1310000003")]


async def test_single_doses_arriving_together_share_their_statements(record: Record, databases: Databases) -> None:
    """Concurrent requests of several callers, on both shards: their keys are claimed together, their doses
    on file read together and their doses written together (fewer statements than requests), and each
    request gets its own answer, as
    if it had been alone — a key answered for one caller is not another caller's key of the same name."""
    claims, reads = databases.claims, databases.reads_of("s0")  # type: ignore[attr-defined]
    writes = databases.writes_of("s0")  # type: ignore[attr-defined]
    calls_before, reads_before, writes_before = claims.calls, reads.calls, writes.calls
    requests = [
        (caller, Submission(key=f"k-{n}", dose=dose(f"{10 * n + i:010d}", municipality=(CHIYODA, SAPPORO)[n % 2])))
        for n in range(1, 31)
        for i, caller in enumerate(CALLERS)
    ]  # the same keys under each caller: keys are the caller's, so none of these collide
    results = await asyncio.gather(*(record(sub, principal=caller) for caller, sub in requests))
    assert all(o.error is None and o.accepted is not None for [o] in results)
    ids = {o.accepted.dose_id for [o] in results if o.accepted}
    assert len(ids) == len(requests)
    assert claims.calls - calls_before < len(requests)  # shared statements
    assert reads.calls - reads_before < len(requests) / 2  # half the doses are on s0
    assert writes.calls - writes_before < len(requests) / 2
    # All again, beside a new caller using the same key names for doses of its own: each retry replays its
    # very dose, and the new caller's doses are new.
    newcomer = Principal(role=Role.INSTITUTION, subject="tablet-4", institution="1310000004")
    fresh = [Submission(key=f"k-{n}", dose=dose(f"{10 * n + 5:010d}")) for n in range(1, 31)]
    again = await asyncio.gather(
        *(record(sub, principal=caller) for caller, sub in requests),
        *(record(sub, principal=newcomer) for sub in fresh),
    )
    assert [o.accepted for [o] in again[: len(requests)]] == [o.accepted for [o] in results]
    newcomers = [o.accepted for [o] in again[len(requests) :] if o.accepted]
    assert len(newcomers) == len(fresh) and all(a.status == "unmatched" for a in newcomers)  # not registered
    assert len({a.dose_id for a in newcomers} - ids) == len(fresh)


async def test_one_key_sent_at_once_with_two_bodies_records_one_and_refuses_the_other(
    record: Record, databases: Databases
) -> None:
    """The same caller's key in one shared claim with two bodies (on two shards): the first body claimed
    wins, the other is a 409 — as when they come one after the other. The same body twice is one dose."""
    for n in range(1, ROUNDS + 1):
        chiyoda = Submission(key=f"twice-{n}", dose=dose(f"{n:010d}"))
        sapporo = Submission(key=f"twice-{n}", dose=dose(f"{n:010d}", municipality=SAPPORO))
        same = Submission(key=f"same-{n}", dose=dose(f"{n + 100:010d}"))
        [a], [b], [c], [d] = await asyncio.gather(record(chiyoda), record(sapporo), record(same), record(same))
        assert sorted([a.error is None, b.error is None]) == [False, True]
        refused = a if a.error is not None else b
        assert refused.error is not None and refused.error.status_code == 409
        assert c.accepted is not None and c.accepted == d.accepted
    assert await count(databases, "s0") + await count(databases, "s1") == 2 * ROUNDS


async def test_a_key_twice_in_one_claim_statement_is_bound_to_its_first_body(databases: Databases) -> None:
    def row(scope: str, key: str, request_hash: str) -> dict[str, Any]:
        return {"scope": scope, "key": key, "request_hash": request_hash, "shard": "s0", "created_at": utcnow()}

    rows = [row("a", "k", "first"), row("b", "k", "other caller"), row("a", "k", "second"), row("a", "j", "j")]
    assert await claim_rows(databases, rows) == ["first", "other caller", "first", "j"]
    assert await claim_rows(databases, [row("a", "k", "third")]) == ["first"]  # and stays so


def _answer(key: str, scope: str = CLINIC.scope_key) -> dict[str, Any]:
    """An Idempotency-Key's answer row, as a write stores it (a write of answers alone: simplest to check)."""
    return {
        "scope": scope, "key": key, "request_hash": "h", "dose_id": key,
        "response": {"dose_id": key, "status": "duplicate", "findings": []}, "created_at": utcnow(),
    }  # fmt: skip


async def _answered(databases: Databases, shard: str, keys: list[str]) -> set[str]:
    async with databases.shards[shard].sessionmaker() as session:
        found, _, _ = await DoseRepository(session).on_file(CLINIC.scope_key, keys, [])
    return set(found)


async def test_writes_arriving_together_are_each_checked_and_stored_as_if_alone(
    record: Record, databases: Databases
) -> None:
    """Concurrent writes of one shard go in one statement (records_writes_as_read): a member whose coupon
    changed since its read (its doses, or its holder) stores nothing and is told so, the others are stored; a
    write sharing a key (or a coupon) with an earlier one goes in the statement after it, and sees what that one
    stored."""
    [first] = await record(Submission(key="first", dose=dose("0000000001")))
    assert first.accepted is not None
    on_file = first.accepted.dose_id
    await registered(databases, ["0000000006", "0000000007"])  # holders at version 1

    def write(key: str, coupon: str, seen: list[str], holder: int = 0) -> DoseWrite:
        return DoseWrite(CLINIC.scope_key, [(CHIYODA, coupon)], [holder], seen, [1] * len(seen), [_answer(key)], [], [])

    writes = [
        write("current", "0000000001", [on_file]),  # read after the first dose: still true
        write("stale", "0000000001", []),  # read before it (the same coupon: a statement of its own)
        write("elsewhere", "0000000002", []),  # a coupon without doses
        write("current", "0000000003", []),  # the first one's key again: after it, and finds it answered
    ]
    assert statements_of(writes) == [[0, 2], [1, 3]]
    assert await write_together(databases, "s0", writes) == [True, False, True, False]
    assert await _answered(databases, "s0", ["current", "stale", "elsewhere"]) == {"current", "elsewhere"}

    # The shared statement itself (not the one-by-one path it falls back to): members 0 and 2 pass.
    together = [
        write("a", "0000000001", [on_file]),
        write("b", "0000000005", ["a dose since voided"]),  # read, and not on file any more
        write("c", "0000000004", []),
        write("d", "0000000006", [], holder=0),  # read before its holder was known
        write("e", "0000000007", [], holder=1),  # read with its holder
    ]
    async with databases.shards["s0"].engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        passed = await driver.fetchval(_RECORD_PG, *_write_args(together))
    assert passed == [0, 2, 4]
    assert await _answered(databases, "s0", ["a", "b", "c", "d", "e"]) == {"a", "c", "e"}


async def test_a_shared_write_failing_for_one_member_fails_that_member_alone(databases: Databases) -> None:
    """A shard fence (a municipality moving away) refuses one member's rows: the shared statement stores
    nothing, and each member is written alone — only the fenced one gets the error."""
    moving = "012025"
    async with databases.shards["s0"].engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO shard_fences (municipality_code, moving_to, fenced_at) VALUES (:m, 's1', now())"),
            {"m": moving},
        )
    event = {"event_id": str(uuid.uuid4()), "key": moving, "payload": b"{}", "created_at": utcnow()}
    writes = [
        DoseWrite(CLINIC.scope_key, [(CHIYODA, "0000000001")], [0], [], [], [_answer("before")], [], []),
        DoseWrite(CLINIC.scope_key, [(moving, "0000000001")], [0], [], [], [_answer("fenced")], [], [event]),
        DoseWrite(CLINIC.scope_key, [(CHIYODA, "0000000002")], [0], [], [], [_answer("after")], [], []),
    ]
    before, fenced, after = await write_together(databases, "s0", writes)
    assert before is True and after is True
    assert isinstance(fenced, DBAPIError) and fenced_municipality(fenced) == moving
    assert await _answered(databases, "s0", ["before", "fenced", "after"]) == {"before", "after"}
