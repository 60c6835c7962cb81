"""records' rules at the service level, on real PostgreSQL with two shards: idempotency (replay, conflict,
global per caller), batches with good and bad items, every finding and who may read its detail, double
scans, corrections and voids, and matching driven by coupon events (twice, out of order)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any

import pytest
from sqlalchemy import event, select, text, update

from services.records.models import CouponProjection, Dose, DoseHistory, outbox
from services.records.schemas import CorrectionIn
from services.records.service import Submission, apply_coupon_events, correct_dose
from shared.db import Databases, UnitOfWork
from shared.domain.age import AgeBand, AgeBand10
from shared.domain.dose_rules import CouponInvalidReason
from shared.domain.sex import Sex
from shared.domain.vaccines import default_rules
from shared.errors import Conflict, InvalidField
from shared.events import CouponEvent, CouponEventType, CouponState, DoseEventType
from shared.outbox import EVENTS_OF_ROW_SQL
from tests.integration.services.records.records_support import (
    CHIYODA,
    CHIYODA_OFFICE,
    SAPPORO,
    TODAY,
    correct,
    count,
    dose,
    doses_in,
    events_in,
    line,
)

pytestmark = pytest.mark.usefixtures("pg_server")
Record = Callable[..., Any]


def issued(
    coupon_number: str, *, version: int = 1, sex: str = "F", birth: date | None = date(1950, 4, 2), **state: Any
) -> CouponEvent:
    return CouponEvent(
        type=CouponEventType.ISSUED,
        municipality=CHIYODA,
        coupon_number=coupon_number,
        version=version,
        state=CouponState(resident_id="A0001", sex=Sex(sex), birth_date=birth, **state),
    )


async def apply(databases: Databases, *events: CouponEvent, shard: str = "s0") -> int:
    async with databases.shards[shard].sessionmaker() as session, session.begin():
        return await apply_coupon_events(session, list(events))


# --- idempotency ---------------------------------------------------------------------------------------


async def test_the_same_key_again_replays_the_first_answer_and_records_nothing_more(
    record: Record, databases: Databases
) -> None:
    [first] = await record(Submission(key="k1", dose=dose("0000000001")))
    [again] = await record(Submission(key="k1", dose=dose("0000000001")))
    assert first.accepted is not None and again.accepted == first.accepted
    assert await count(databases, "s0") == 1
    assert len(await events_in(databases, "s0")) == 1


async def test_the_same_key_with_another_body_is_a_conflict(record: Record, databases: Databases) -> None:
    await record(Submission(key="k1", dose=dose("0000000001")))
    [other] = await record(Submission(key="k1", dose=dose("0000000001", lot_number="FA5765")))
    assert isinstance(other.error, Conflict) and "Idempotency-Key" in other.error.detail
    assert await count(databases, "s0") == 1


async def test_a_key_is_the_callers_across_shards(record: Record, databases: Databases) -> None:
    """The same key with another municipality's coupon (another shard) is not a second dose."""
    [first] = await record(Submission(key="k1", dose=dose("0000000001")))
    [other] = await record(Submission(key="k1", dose=dose("0000000001", municipality=SAPPORO)))
    assert first.accepted is not None
    assert isinstance(other.error, Conflict)
    assert (await count(databases, "s0"), await count(databases, "s1")) == (1, 0)


async def test_keys_of_different_callers_do_not_collide(record: Record, databases: Databases) -> None:
    await record(Submission(key="k1", dose=dose("0000000001")))
    [office] = await record(Submission(key="k1", dose=dose("0000000002")), principal=CHIYODA_OFFICE)
    assert office.accepted is not None and office.accepted.status == "unmatched"
    assert await count(databases, "s0") == 2


async def test_a_batch_records_its_good_items_and_reports_each_bad_one_in_order(
    record: Record, databases: Databases
) -> None:
    outcomes = await record(
        Submission(key="b:1", dose=dose("0000000001"), key_field="doses[0].client_id"),
        Submission(key="b:2", dose=dose("0000000002", vaccinated_on=date(2030, 1, 1))),
        Submission(key="b:3", dose=dose("0000000003", municipality=SAPPORO)),
        Submission(key="b:4", dose=dose("0000000004", vaccine="sputnik")),
        Submission(key="b:5", dose=dose("0000000005", dose_number=11)),
    )
    assert [o.accepted.status if o.accepted else None for o in outcomes] == [
        "unmatched",
        None,
        "unmatched",
        None,
        None,
    ]
    errors = [o.error for o in outcomes]
    assert [e.field if isinstance(e, InvalidField) else None for e in errors] == [
        None,
        "vaccinated_on",
        None,
        "vaccine",
        "dose_number",
    ]
    assert (await count(databases, "s0"), await count(databases, "s1")) == (1, 1)


async def test_a_batchs_events_travel_as_one_outbox_row_per_municipality_and_shard(
    record: Record, databases: Databases
) -> None:
    outcomes = await record(
        *(Submission(key=f"e:{n}", dose=dose(f"{n:010d}")) for n in range(1, 4)),
        Submission(key="e:9", dose=dose("0000000009", municipality=SAPPORO)),
    )
    assert all(o.accepted is not None for o in outcomes)
    async with databases.shards["s0"].sessionmaker() as session:
        [row] = (await session.execute(select(outbox.c.key, outbox.c.payload))).all()
    assert row.key == CHIYODA and row.payload.startswith(b"[")  # one message for the three, not three
    chiyoda = await events_in(databases, "s0")
    assert [str(e.dose_id) for e in chiyoda] == [o.accepted.dose_id for o in outcomes[:3] if o.accepted]
    assert len({e.event_id for e in chiyoda}) == 3  # each keeps its own id: stats counts each once
    [sapporo] = await events_in(databases, "s1")  # alone in its shard: a single event, as a single dose writes
    async with databases.shards["s1"].sessionmaker() as session:
        assert (await session.scalar(select(outbox.c.payload))) == sapporo.to_bytes()
    for shard, events in (("s0", 3), ("s1", 1)):
        async with databases.shards[shard].sessionmaker() as session:
            if session.get_bind().dialect.name == "postgresql":  # what the soak and the stats bench count with
                assert await session.scalar(text(f"SELECT sum({EVENTS_OF_ROW_SQL}) FROM outbox")) == events


# --- findings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("earlier", "new", "code"),
    [
        ({}, {"coupon": line("0000000001", dose_number=2)}, "coupon_dose_mismatch"),
        ({"lot_number": "FA5765"}, {"lot_number": "FF2782"}, "duplicate_dose"),
        ({"dose_number": 2, "vaccinated_on": date(2021, 5, 1)}, {}, "dose_order"),
        ({}, {"dose_number": 2, "vaccinated_on": date(2021, 6, 10)}, "interval_too_short"),
        (
            {"vaccine": "astrazeneca", "lot_number": "PV46672"},
            {"dose_number": 2, "vaccinated_on": date(2021, 9, 1), "vaccine": "astrazeneca", "lot_number": "PV46672"},
            "interval_too_long",
        ),
        ({}, {"dose_number": 2, "vaccinated_on": date(2021, 6, 22), "lot_number": "12 34"}, "lot_format"),
    ],
)
async def test_each_finding_sends_the_dose_to_review_and_only_the_issuer_reads_its_detail(
    record: Record, databases: Databases, earlier: dict[str, Any], new: dict[str, Any], code: str
) -> None:
    await record(Submission(key="first", dose=dose("0000000001", **earlier)))
    [clinic] = await record(Submission(key="second", dose=dose("0000000001", **new)))
    [office] = await record(Submission(key="second", dose=dose("0000000001", **new)), principal=CHIYODA_OFFICE)
    assert clinic.accepted is not None and clinic.accepted.status == "needs_review"
    assert code in [f.code for f in clinic.accepted.findings]
    # The tablet learns which rule, never another record's dates or products.
    assert all(f.detail is None for f in clinic.accepted.findings)
    assert "2021" not in " ".join(f.message for f in clinic.accepted.findings)
    # The issuing municipality sees the specifics, and so does its review queue.
    assert office.accepted is not None and all(f.detail for f in office.accepted.findings)
    stored = [d for d in await doses_in(databases, "s0") if d.dose_id == clinic.accepted.dose_id]
    assert stored and all(f.get("detail") for f in stored[0].findings)


async def test_a_dose_after_the_coupon_stopped_being_valid_is_kept_for_review(
    record: Record, databases: Databases
) -> None:
    await apply(
        databases,
        issued("0000000001", invalid_from=date(2021, 6, 15), invalid_reason=CouponInvalidReason.MOVED_OUT, version=2),
    )
    [before] = await record(Submission(key="a", dose=dose("0000000001", vaccinated_on=date(2021, 6, 1))))
    [after] = await record(Submission(key="b", dose=dose("0000000001", dose_number=2, vaccinated_on=date(2021, 6, 30))))
    assert before.accepted is not None and before.accepted.status == "recorded"
    assert after.accepted is not None and after.accepted.status == "needs_review"
    assert [f.code for f in after.accepted.findings] == ["coupon_not_valid"]


def moved_out(coupon_number: str, on: date, *, version: int = 2) -> CouponEvent:
    return issued(coupon_number, invalid_from=on, invalid_reason=CouponInvalidReason.MOVED_OUT, version=version)


async def test_a_dose_matched_after_its_coupon_ended_goes_to_review(record: Record, databases: Databases) -> None:
    """Recorded before the projection knew the coupon (unmatched), dated after its holder moved out: the coupon
    event holds it to the coupon's end, as recording it later would have."""
    [out] = await record(Submission(key="k", dose=dose("0000000001", vaccinated_on=date(2021, 6, 30))))
    assert out.accepted is not None and out.accepted.status == "unmatched"
    await apply(databases, moved_out("0000000001", date(2021, 6, 15)))
    [stored] = await doses_in(databases, "s0")
    assert (stored.status, stored.resident_id) == ("needs_review", "A0001")
    assert [f["code"] for f in stored.findings] == ["coupon_not_valid"]
    assert "2021-06-15" in stored.findings[0]["detail"]
    assert [e.type for e in await events_in(databases, "s0")] == [DoseEventType.RECORDED, DoseEventType.MATCHED]


async def test_a_move_out_learned_late_sends_the_doses_after_it_to_review(record: Record, databases: Databases) -> None:
    await apply(databases, issued("0000000001"))
    [before] = await record(Submission(key="a", dose=dose("0000000001", vaccinated_on=date(2021, 6, 1))))
    [after] = await record(Submission(key="b", dose=dose("0000000001", dose_number=2, vaccinated_on=date(2021, 6, 30))))
    assert before.accepted is not None and after.accepted is not None
    assert (before.accepted.status, after.accepted.status) == ("recorded", "recorded")
    await apply(databases, moved_out("0000000001", date(2021, 6, 15)))
    await apply(databases, moved_out("0000000001", date(2021, 6, 15)))  # a repeat adds nothing
    stored = {d.dose_id: d for d in await doses_in(databases, "s0")}
    assert stored[before.accepted.dose_id].status == "recorded"
    flagged = stored[after.accepted.dose_id]
    assert (flagged.status, [f["code"] for f in flagged.findings], flagged.version) == (
        "needs_review",
        ["coupon_not_valid"],
        2,
    )
    # Its count did not move: no dose event, but the state before is kept.
    assert [e.type for e in await events_in(databases, "s0")] == [DoseEventType.RECORDED] * 2
    async with databases.shards["s0"].sessionmaker() as session:
        history = list((await session.execute(select(DoseHistory))).scalars())
    assert [(h.dose_id, h.change, h.before["status"]) for h in history] == [
        (after.accepted.dose_id, "corrected", "recorded")
    ]


async def test_a_double_scan_answers_with_the_first_dose_and_stores_nothing(
    record: Record, databases: Databases
) -> None:
    [first] = await record(Submission(key="scan-1", dose=dose("0000000001")))
    [second] = await record(Submission(key="scan-2", dose=dose("0000000001", venue="第二会場")))
    assert first.accepted is not None and second.accepted is not None
    assert (second.accepted.status, second.accepted.dose_id) == ("duplicate", first.accepted.dose_id)
    assert await count(databases, "s0") == 1
    assert len(await events_in(databases, "s0")) == 1
    [replayed] = await record(Submission(key="scan-2", dose=dose("0000000001", venue="第二会場")))
    assert replayed.accepted == second.accepted


# --- matching from coupon events -----------------------------------------------------------------------


async def test_a_coupon_event_matches_the_unmatched_doses_and_moves_their_counts(
    record: Record, databases: Databases
) -> None:
    [out] = await record(Submission(key="k", dose=dose("0000000001", vaccinated_on=date(2021, 6, 1))))
    assert out.accepted is not None and out.accepted.status == "unmatched"
    assert await apply(databases, issued("0000000001", sex="F", birth=date(1950, 4, 2))) == 1
    [stored] = await doses_in(databases, "s0")
    assert (stored.status, stored.sex, stored.age_band, stored.resident_id) == (
        "recorded",
        "F",
        AgeBand.SIXTY_FIVE_PLUS.value,
        "A0001",
    )
    recorded, matched = await events_in(databases, "s0")
    assert matched.type is DoseEventType.MATCHED
    assert matched.previous_cell == recorded.cell
    assert matched.cell is not None and (matched.cell.sex, matched.cell.age_band) == ("F", AgeBand.SIXTY_FIVE_PLUS)
    # Born 1950-04-02, vaccinated 2021-06-01: 71, in the seventies; unknown while unmatched.
    assert recorded.cell is not None and recorded.cell.age_band_10 is AgeBand10.UNKNOWN
    assert matched.cell.age_band_10 is AgeBand10.AGE_70_79
    assert stored.age_band_10 == "70-79"


async def test_a_coupon_event_twice_or_out_of_order_changes_nothing_more(record: Record, databases: Databases) -> None:
    await record(Submission(key="k", dose=dose("0000000001")))
    newer = issued("0000000001", version=2, sex="M")
    older = issued("0000000001", version=1, sex="F")
    assert await apply(databases, newer) == 1
    assert await apply(databases, newer) == 0  # the same event again
    assert await apply(databases, older) == 0  # an older state arriving late
    [stored] = await doses_in(databases, "s0")
    assert stored.sex == "M"
    assert [e.type for e in await events_in(databases, "s0")] == [DoseEventType.RECORDED, DoseEventType.MATCHED]
    async with databases.shards["s0"].sessionmaker() as session:
        projection = (await session.execute(select(CouponProjection))).scalar_one()
    assert (projection.version, projection.sex) == (2, "M")


async def test_several_events_of_one_new_coupon_in_one_batch_leave_its_newest_state(
    record: Record, databases: Databases
) -> None:
    """A consumer's batch often holds a coupon's issue and its next change (found by make soak)."""
    await record(Submission(key="k", dose=dose("0000000001")))
    assert await apply(databases, issued("0000000001", version=2, sex="M"), issued("0000000001", version=1)) == 1
    [stored] = await doses_in(databases, "s0")
    assert (stored.status, stored.sex) == ("recorded", "M")
    assert [e.type for e in await events_in(databases, "s0")] == [DoseEventType.RECORDED, DoseEventType.MATCHED]


async def test_a_batch_of_many_coupons_applies_each_and_matches_only_their_own_doses(
    record: Record, databases: Databases
) -> None:
    """A bulk import announces its coupons by the thousand: one batch, read and locked as one."""
    for n, number in enumerate(("0000000001", "0000000002", "0000000002", "0000000003")):
        day = date(2021, 6, 1 + n)
        await record(Submission(key=f"k{n}", dose=dose(number, vaccinated_on=day, dose_number=1 + n % 2)))
    assert await apply(databases, issued("0000000003", version=3, sex="M")) == 1  # known before the batch
    batch = [issued(f"{i:010d}", sex="F") for i in range(1, 301)] + [issued("0000000003", version=2)]
    assert await apply(databases, *batch) == 299  # coupon 3: versions 1 and 2 are older than what is known
    stored = {d.dose_id: d for d in await doses_in(databases, "s0")}
    assert sorted((d.coupon_number, d.status != "unmatched", d.sex) for d in stored.values()) == [
        ("0000000001", True, "F"),
        ("0000000002", True, "F"),
        ("0000000002", True, "F"),
        ("0000000003", True, "M"),
    ]
    moved = [e for e in await events_in(databases, "s0") if e.type is DoseEventType.MATCHED]
    assert sorted(str(e.dose_id) for e in moved) == sorted(stored)  # each dose matched once, by its own coupon
    async with databases.shards["s0"].sessionmaker() as session:
        assert len((await session.execute(select(CouponProjection))).scalars().all()) == 300


async def test_a_batch_moving_many_doses_writes_them_in_a_few_statements(record: Record, databases: Databases) -> None:
    """The batch holds the doses' row locks until it commits, and a municipality correcting one of them waits:
    its writes cost a few statements for the batch, not a few per dose (after a Kafka outage, the backlog's
    batch held them 8-12 s in the soak while a correction waited) — also when it mixes matches with changes
    of a holder's sex, which change different columns."""
    numbers = [f"{n:010d}" for n in range(1, 41)]
    for number in numbers:
        await record(
            *(
                Submission(key=f"{number}-{d}", dose=dose(number, dose_number=d, vaccinated_on=date(2021, 5 + d, 1)))
                for d in (1, 2)
            )
        )
    await apply(databases, *(issued(n, sex="M") for n in numbers[::2]))  # every other coupon matched already
    before = len(await events_in(databases, "s0"))
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement.split()[0])

    engine = databases.shards["s0"].engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        assert await apply(databases, *(issued(n, version=2, sex="F") for n in numbers)) == len(numbers)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    moved = (await events_in(databases, "s0"))[before:]
    assert sorted(e.type.value for e in moved) == ["dose.corrected"] * 40 + ["dose.matched"] * 40
    assert {d.sex for d in await doses_in(databases, "s0")} == {"F"}
    assert len(statements) <= 10, statements  # 80 doses moved: was 3 statements a dose


async def test_a_holder_change_recells_matched_doses_with_a_correction_event(
    record: Record, databases: Databases
) -> None:
    await apply(databases, issued("0000000001", birth=None, sex="U"))
    await record(Submission(key="k", dose=dose("0000000001")))
    await apply(databases, issued("0000000001", version=2, birth=date(1990, 1, 1), sex="F"))
    events = await events_in(databases, "s0")
    assert [e.type for e in events] == [DoseEventType.RECORDED, DoseEventType.CORRECTED]
    assert events[1].previous_cell is not None and events[1].previous_cell.age_band is AgeBand.UNKNOWN
    assert events[1].cell is not None and events[1].cell.age_band is AgeBand.UNDER_65
    assert events[1].previous_cell.age_band_10 is AgeBand10.UNKNOWN
    assert events[1].cell.age_band_10 is AgeBand10.AGE_30_39  # born 1990-01-01, vaccinated 2021-06-01: 31


async def test_a_date_correction_across_a_birthday_moves_the_10_year_band(record: Record, databases: Databases) -> None:
    # Born 1991-06-03: 30 from the eve of the birthday, 2021-06-02, on (年齢計算ニ関スル法律).
    await apply(databases, issued("0000000001", birth=date(1991, 6, 3)))
    [out] = await record(Submission(key="k", dose=dose("0000000001", vaccinated_on=date(2021, 6, 1))))
    assert out.accepted is not None
    for correction in (
        CorrectionIn(changes={"vaccinated_on": "2021-06-02"}, reason="date"),
        CorrectionIn(void=True, reason="x"),
    ):
        await correct(databases, out.accepted.dose_id, correction)
    recorded, corrected, voided = await events_in(databases, "s0")
    assert recorded.cell is not None and recorded.cell.age_band_10 is AgeBand10.AGE_20_29
    assert corrected.previous_cell == recorded.cell
    assert corrected.cell is not None and corrected.cell.age_band_10 is AgeBand10.AGE_30_39
    assert (voided.previous_cell, voided.cell) == (corrected.cell, None)


async def test_a_dose_stored_before_the_10_year_band_takes_back_what_its_event_added(
    record: Record, databases: Databases
) -> None:
    """Doses recorded before the column existed keep UNK (the migration's default), as their events had no band:
    the next event of such a dose takes the count out of UNK, where stats put it, and into the real band."""
    await apply(databases, issued("0000000001", birth=date(1950, 4, 2)))
    [out] = await record(Submission(key="k", dose=dose("0000000001", vaccinated_on=date(2021, 6, 1))))
    assert out.accepted is not None
    async with databases.shards["s0"].sessionmaker() as session, session.begin():
        await session.execute(update(Dose).values(age_band_10="UNK"))
    await correct(databases, out.accepted.dose_id, CorrectionIn(changes={"lot_number": "FA5765"}, reason="lot"))
    _, corrected = await events_in(databases, "s0")
    assert corrected.previous_cell is not None and corrected.previous_cell.age_band_10 is AgeBand10.UNKNOWN
    assert corrected.cell is not None and corrected.cell.age_band_10 is AgeBand10.AGE_70_79


# --- corrections and voids ------------------------------------------------------------------------------


async def test_reviewed_true_clears_the_findings_and_anything_but_a_boolean_is_refused(
    record: Record, databases: Databases
) -> None:
    await apply(databases, issued("0000000001"))
    await record(Submission(key="a", dose=dose("0000000001")))
    [again] = await record(Submission(key="b", dose=dose("0000000001", vaccinated_on=date(2021, 6, 2))))
    assert again.accepted is not None and again.accepted.status == "needs_review"
    dose_id = again.accepted.dose_id
    for not_a_boolean in ("false", "true", 0, 1, None):
        with pytest.raises(InvalidField) as refused:
            await correct(databases, dose_id, CorrectionIn(changes={"reviewed": not_a_boolean}, reason="checked"))
        assert refused.value.field == "changes.reviewed"
    [unchanged] = [d for d in await doses_in(databases, "s0") if d.dose_id == dose_id]
    assert (unchanged.status, unchanged.version) == ("needs_review", 1)
    await correct(databases, dose_id, CorrectionIn(changes={"reviewed": True}, reason="second dose 1 confirmed"))
    [reviewed] = [d for d in await doses_in(databases, "s0") if d.dose_id == dose_id]
    assert (reviewed.status, reviewed.findings) == ("recorded", [])


async def test_a_correction_keeps_the_state_before_and_moves_the_count(record: Record, databases: Databases) -> None:
    [out] = await record(Submission(key="k", dose=dose("0000000001")))
    assert out.accepted is not None
    await correct(
        databases,
        out.accepted.dose_id,
        CorrectionIn(changes={"vaccinated_on": "2021-06-03"}, reason="typo on the tablet"),
    )
    async with UnitOfWork(databases) as uow:
        voided = await correct_dose(
            uow,
            principal=CHIYODA_OFFICE,
            municipality_code=CHIYODA,
            dose_id=out.accepted.dose_id,
            correction=CorrectionIn(void=True, reason="recorded on the wrong coupon"),
            rules=default_rules(),
            today=TODAY,
        )
    assert voided.voided and voided.version == 3
    recorded, corrected, void = await events_in(databases, "s0")
    assert corrected.previous_cell == recorded.cell
    assert corrected.cell is not None and corrected.cell.date == date(2021, 6, 3)
    assert (void.type, void.previous_cell, void.cell) == (DoseEventType.VOIDED, corrected.cell, None)
    async with databases.shards["s0"].sessionmaker() as session:
        history = list((await session.execute(select(DoseHistory).order_by(DoseHistory.id))).scalars())
    assert [(h.change, h.version, h.before["vaccinated_on"]) for h in history] == [
        ("corrected", 1, "2021-06-01"),
        ("voided", 2, "2021-06-03"),
    ]
    async with UnitOfWork(databases) as uow:
        with pytest.raises(Conflict):
            await correct_dose(
                uow,
                principal=CHIYODA_OFFICE,
                municipality_code=CHIYODA,
                dose_id=out.accepted.dose_id,
                correction=CorrectionIn(changes={"lot_number": "FA5765"}, reason="too late"),
                rules=default_rules(),
                today=TODAY,
            )
