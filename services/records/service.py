"""Records rules: ingest (single and batch, idempotent), coupon events, corrections and voids.

Every change to a dose writes its event to the outbox in the same transaction, carrying the statistics
cell before and after, so stats moves exactly one count from the old cell to the new one.

Recording a dose reads only records' own databases: who holds a coupon comes from the coupon projection,
which registry's ``coupon-events`` keep up to date (:func:`apply_coupon_events`). A dose for a coupon the
projection does not know yet is ``unmatched`` and moves to its holder's cell when the coupon's event comes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, NamedTuple

from prometheus_client import Counter
from pydantic import ValidationError

from services.records.models import CouponProjection, Dose, DoseImport, outbox
from services.records.repository import (
    ClaimRepository,
    DoseRepository,
    ImportRepository,
    OnFile,
    ProjectionRepository,
    dose_path,
    locked_dose_path,
)
from services.records.schemas import CorrectionIn, CouponStatusOut, DoseAccepted, DoseIn, DoseOut, FindingOut
from shared.auth import Principal, Role
from shared.db import UnitOfWork, utcnow
from shared.domain.age import AgeBand, AgeBand10, age_band, age_band_10
from shared.domain.coupon import CouponLine, CouponLineError, parse_coupon_line
from shared.domain.csv_stream import CsvFileError, Parsed
from shared.domain.dose_csv import DoseRow, parse_dose_csv
from shared.domain.dose_rules import (
    CouponInvalidReason,
    CouponValidity,
    DoseFacts,
    DoseOnFile,
    DoseRejected,
    DoseStatus,
    EarlierDose,
    Finding,
    FindingCode,
    check_admissible,
    coupon_validity_findings,
    decide_status,
    find_exact_duplicate,
    review_findings,
)
from shared.domain.sex import Sex
from shared.domain.vaccines import VaccineRules
from shared.errors import Conflict, InvalidField, NotFound, ServiceUnavailable, VRSError
from shared.events import CouponEvent, DoseEvent, DoseEventType, StatsCell
from shared.ids import random_uuids
from shared.outbox import OutboxRepository, outbox_rows
from shared.trusted import built

log = logging.getLogger(__name__)

CouponKey = tuple[str, str]  # (issuing municipality, coupon number)


def dose_not_found() -> NotFound:
    return NotFound("dose not found")


@dataclass(frozen=True, slots=True)
class Submission:
    key: str  # the idempotency key: the header for a single dose, the client_id in a batch
    dose: DoseIn
    key_field: str = "Idempotency-Key"  # what a conflict names: the header, or the batch item's client_id


@dataclass(slots=True)
class Outcome:
    accepted: DoseAccepted | None = None
    error: VRSError | None = None


# A batch item is a DoseIn with its client_id: hashed as the same dose sent alone would be.
_HASHED_FIELDS = set(DoseIn.model_fields)


# The text hashed must never change (stored hashes are compared with new requests): the very output of
# ``json.dumps(..., sort_keys=True, separators=(",", ":"))``, from one encoder built once.
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def request_hash(dose: DoseIn) -> str:
    canonical = _canonical(dose.model_dump(mode="json", include=_HASHED_FIELDS))
    return hashlib.sha256(canonical.encode()).hexdigest()


def cell_of(dose: Dose) -> StatsCell | None:
    if dose.voided:
        return None
    return StatsCell(
        date=dose.vaccinated_on,
        prefecture=dose.municipality_code[:2],
        municipality=dose.municipality_code,
        sex=dose.sex,
        age_band=dose.age_band,
        age_band_10=dose.age_band_10,
        medical_worker=dose.medical_worker,
        dose_number=dose.dose_number,
        vaccine=dose.vaccine,
    )


def _facts(dose: DoseIn) -> DoseFacts:
    return DoseFacts(
        coupon_line=dose.coupon,
        dose_number=dose.dose_number,
        vaccinated_on=dose.vaccinated_on,
        vaccine=dose.vaccine,
        lot_number=dose.lot_number,
    )


def _earlier(doses: Sequence[Dose], *, excluding: str | None = None) -> list[EarlierDose]:
    return [
        EarlierDose(dose_number=d.dose_number, vaccinated_on=d.vaccinated_on, vaccine=d.vaccine)
        for d in doses
        if d.dose_id != excluding and not d.voided
    ]


def validity_of(coupon: Any) -> CouponValidity | None:
    """The coupon's end of validity from its projection (an ORM object or a row), None while valid."""
    if coupon is None or coupon.invalid_from is None or coupon.invalid_reason is None:
        return None
    reason = CouponInvalidReason(coupon.invalid_reason)
    if reason is CouponInvalidReason.MOVED_OUT:
        return CouponValidity.moved_out(coupon.invalid_from)
    return CouponValidity.no_longer_valid_from(coupon.invalid_from, reason)


def _shown(findings: Sequence[Finding], *, with_detail: bool) -> list[FindingOut]:
    return [FindingOut.model_validate(f.as_dict(with_detail=with_detail)) for f in findings]


def _may_see_detail(principal: Principal, municipality_code: str) -> bool:
    """Only the issuing municipality sees what a finding says about the person's other doses."""
    return principal.role is Role.MUNICIPALITY and principal.municipality == municipality_code


def _event(kind: DoseEventType, dose: Dose, previous: StatsCell | None) -> DoseEvent:
    """The event of ``dose`` as it now is."""
    return DoseEvent(
        type=kind,
        dose_id=uuid.UUID(dose.dose_id),
        municipality=dose.municipality_code,
        cell=cell_of(dose),
        previous_cell=previous,
    )


async def record_doses(
    uow: UnitOfWork,
    *,
    principal: Principal,
    submissions: Sequence[Submission],
    rules: VaccineRules,
    today: date,
) -> list[Outcome]:
    """Record doses; one outcome per submission, in order. A repeated key replays the first answer.

    The whole batch costs one statement per step, whatever its size: the claim of its keys (main database),
    and per shard: one read (the keys already answered, the coupons' holders, their doses on file) and one
    write (keys, doses and outbox events), which on PostgreSQL takes the coupons' locks and stores nothing
    if another request changed those coupons' doses since the read — then the shard is read and decided
    again (:meth:`DoseRepository.record`). The claim and the first shard's read run at the same time: the
    read does not need the claim's answer, only the decision does (a key refused there stores nothing).
    """
    outcomes = [Outcome() for _ in submissions]
    admissible: list[_Item] = []
    for i, sub in enumerate(submissions):
        facts = _facts(sub.dose)
        try:
            coupon = check_admissible(facts, today=today, rules=rules)
        except DoseRejected as exc:
            outcomes[i].error = InvalidField(exc.field, exc.message)
            continue
        admissible.append(_Item(i, sub, facts, coupon, request_hash(sub.dose)))
    if not admissible:
        return outcomes

    by_shard: dict[str, list[_Item]] = defaultdict(list)
    shards = await uow.databases.shards_of(item.coupon.municipality_code for item in admissible)
    for item in admissible:
        by_shard[shards[item.coupon.municipality_code]].append(item)
    now = utcnow()
    scope = principal.scope_key  # a property: built once here, not once per item
    # Keys are the caller's, not a shard's: claimed once in the main database, whatever the coupon. The claim runs
    # beside the first shard's read (a single dose waits for two rounds, not three); later shards find it done.
    claims = asyncio.ensure_future(
        ClaimRepository(uow.databases).claim(
            [
                {"scope": scope, "key": item.sub.key, "request_hash": item.hash, "shard": shard} | {"created_at": now}
                for shard, items in by_shard.items()
                for item in items
            ]
        )
    )
    try:
        for shard, items in by_shard.items():
            await _record_in_shard(uow, shard, items, outcomes, claims, principal=principal, rules=rules, now=now)
    finally:
        claims.cancel()  # a no-op once the claim is done; else the request failed before it needed the claim
    return outcomes


@dataclass(frozen=True, slots=True)
class _Item:
    index: int  # the submission's place in the request
    sub: Submission
    facts: DoseFacts
    coupon: CouponLine
    hash: str

    @property
    def coupon_key(self) -> CouponKey:
        return (self.coupon.municipality_code, self.coupon.coupon_number)


def _key_conflict(sub: Submission) -> Conflict:
    return Conflict(f"{sub.key_field}: was already used for a different dose")


async def _record_in_shard(
    uow: UnitOfWork,
    shard: str,
    items: Sequence[_Item],
    outcomes: list[Outcome],
    claims: Awaitable[dict[str, str]],
    *,
    principal: Principal,
    rules: VaccineRules,
    now: datetime,
) -> None:
    scope = principal.scope_key
    keys = [item.sub.key for item in items]
    coupon_keys = sorted({item.coupon_key for item in items})
    async with dose_path(uow, shard) as doses:

        async def first_read() -> OnFile:
            await doses.begin()
            return await doses.on_file(scope, keys, coupon_keys)

        read, claimed = await asyncio.gather(first_read(), claims)
        valid = []
        for item in items:
            if claimed[item.sub.key] != item.hash:
                outcomes[item.index].error = _key_conflict(item.sub)
            else:
                valid.append(item)
        if not valid:
            return
        # The read and the checks under the coupons' locks cover every item's coupon, a refused key's too.
        for attempt in range(_OPTIMISTIC_WRITES):
            if attempt:
                read = await doses.on_file(scope, keys, coupon_keys)
            if await _try_record(doses, valid, outcomes, coupon_keys, read, principal=principal, rules=rules, now=now):
                return
            WRITES_REFUSED.labels(shard=shard, decided="on_a_read").inc()
    locked = uow.databases.shards[shard].engine.dialect.name == "postgresql"
    if locked:
        # Its coupons kept changing between each read and write: read and decide under their locks.
        async with locked_dose_path(uow, shard, coupon_keys) as under_locks:
            read = await under_locks.on_file(scope, keys, coupon_keys)
            if await _try_record(
                under_locks, valid, outcomes, coupon_keys, read, principal=principal, rules=rules, now=now
            ):
                return
        WRITES_REFUSED.labels(shard=shard, decided="under_locks").inc()
    log.warning(
        "a write of %d doses on %d coupons to shard %s was refused %d times%s: answered 503",
        len(valid),
        len(coupon_keys),
        shard,
        _OPTIMISTIC_WRITES,
        " and once under the coupons' locks" if locked else "",
    )
    raise ServiceUnavailable("these coupons are being changed by other requests; try again")


# Every refused write, by how it was decided: on an unlocked read (then decided again; after
# _OPTIMISTIC_WRITES of them, under the coupons' locks) or under the locks (then answered 503). A rate that
# climbs says requests keep meeting each other on the same coupons, or a coupon-event backlog is moving them.
WRITES_REFUSED = Counter(
    "vrs_records_dose_writes_refused_total",
    "Dose writes refused because their coupons' doses, holders or keys changed since they were read",
    ["shard", "decided"],
)

# A write is refused (and decided again) when, between its read and its write, another request recorded a dose
# of one of its coupons or a coupon event changed one's holder. After this many such refusals the request reads
# and decides holding its coupons' locks (locked_dose_path): a batch whose coupons a coupon-event backlog kept
# changing, one bounded transaction after another, was refused ten times and answered 503 (make soak).
_OPTIMISTIC_WRITES = 3


async def _try_record(
    doses: DoseRepository,
    items: Sequence[_Item],
    outcomes: list[Outcome],
    coupon_keys: Sequence[CouponKey],
    read: OnFile,
    *,
    principal: Principal,
    rules: VaccineRules,
    now: datetime,
) -> bool:
    """Decide on what was ``read`` and write once; False when it changed before the write (nothing stored)."""
    scope = principal.scope_key
    stored, holders, on_file_rows = read
    # Answer repeats first: a retry must not change anything.
    fresh = []
    for item in items:
        if item.sub.key in stored:
            outcomes[item.index] = _replay(stored[item.sub.key], item)
        else:
            fresh.append(item)
    if not fresh:
        return True

    on_file: dict[CouponKey, list[DoseOnFile]] = defaultdict(list)
    for stored_dose in on_file_rows:
        on_file[(stored_dose.municipality_code, stored_dose.coupon_number)].append(
            DoseOnFile(
                dose_id=stored_dose.dose_id,
                coupon_line=stored_dose.coupon_line,
                dose_number=stored_dose.dose_number,
                vaccinated_on=stored_dose.vaccinated_on,
                vaccine=stored_dose.vaccine,
                lot_number=stored_dose.lot_number,
            )
        )

    key_rows: list[dict[str, Any]] = []
    dose_rows: list[dict[str, Any]] = []
    answers: list[tuple[_Item, DoseAccepted]] = []
    ids = iter(random_uuids(2 * len(fresh)))  # a dose id and an event id for each that may be new
    dose_ids: list[uuid.UUID] = []  # of dose_rows, in order
    for item in fresh:
        earlier = on_file[item.coupon_key]
        duplicate_of = find_exact_duplicate(item.facts, earlier)
        if duplicate_of is not None:  # a double scan: answer with the first dose, store and count nothing
            accepted = DoseAccepted(dose_id=duplicate_of, status="duplicate", findings=[])
        else:
            holder = holders.get(item.coupon_key)
            findings = review_findings(
                item.facts,
                item.coupon,
                [EarlierDose(d.dose_number, d.vaccinated_on, d.vaccine) for d in earlier],
                rules=rules,
                validity=validity_of(holder),
            )
            status = decide_status(findings, matched=holder is not None)
            dose_id = next(ids)
            row = _new_dose(item, holder, status, findings, dose_id=str(dose_id), rules=rules, by=scope, now=now)
            dose_ids.append(dose_id)
            dose_rows.append(row)
            earlier.append(  # a batch may carry dose 1 and dose 2 of one person
                DoseOnFile(
                    dose_id=row["dose_id"],
                    coupon_line=row["coupon_line"],
                    dose_number=row["dose_number"],
                    vaccinated_on=row["vaccinated_on"],
                    vaccine=row["vaccine"],
                    lot_number=row["lot_number"],
                )
            )
            shown = _shown(findings, with_detail=_may_see_detail(principal, item.coupon.municipality_code))
            # Not validated again: the id is new, the status one of DoseStatus, the findings FindingOut already.
            accepted = built(DoseAccepted, dose_id=row["dose_id"], status=status.value, findings=shown)
        answers.append((item, accepted))
        key_rows.append(
            {
                "scope": scope,
                "key": item.sub.key,
                "request_hash": item.hash,
                "dose_id": accepted.dose_id,
                "response": accepted.model_dump(mode="json"),
                "created_at": now,
            }
        )

    # Built without re-validation (shared.trusted): every field comes from a dose the rules just accepted.
    events = [
        built(
            DoseEvent,
            schema_version=1,
            event_id=next(ids),
            occurred_at=now,
            municipality=row["municipality_code"],
            type=DoseEventType.RECORDED,
            dose_id=dose_id,
            cell=_cell(row),
            previous_cell=None,
        )
        for row, dose_id in zip(dose_rows, dose_ids, strict=True)
    ]
    written = await doses.record(
        key_rows,
        dose_rows,
        outbox_rows(events),
        scope=scope,
        coupons=coupon_keys,
        versions=[holders[k].version if k in holders else 0 for k in coupon_keys],
        seen=[d.dose_id for d in on_file_rows],
        seen_versions=[d.version for d in on_file_rows],
    )
    if written:
        for item, accepted in answers:
            outcomes[item.index] = Outcome(accepted=accepted)
    return written


def _replay(stored: tuple[str, dict[str, Any]], item: _Item) -> Outcome:
    request_hash_, response = stored
    if request_hash_ != item.hash:
        return Outcome(error=_key_conflict(item.sub))
    return Outcome(accepted=DoseAccepted.model_validate(response))


def _cell(row: dict[str, Any]) -> StatsCell:
    return built(
        StatsCell,
        date=row["vaccinated_on"],
        prefecture=row["municipality_code"][:2],
        municipality=row["municipality_code"],
        sex=Sex(row["sex"]),
        age_band=AgeBand(row["age_band"]),
        age_band_10=AgeBand10(row["age_band_10"]),
        medical_worker=row["medical_worker"],
        dose_number=row["dose_number"],
        vaccine=row["vaccine"],
    )


def _new_dose(
    item: _Item,
    holder: Any,
    status: DoseStatus,
    findings: Sequence[Finding],
    *,
    dose_id: str,
    rules: VaccineRules,
    by: str,
    now: datetime,
) -> dict[str, Any]:
    dose, coupon = item.sub.dose, item.coupon
    return {
        "dose_id": dose_id,
        "municipality_code": coupon.municipality_code,
        "coupon_number": coupon.coupon_number,
        "coupon_line": str(coupon),
        "dose_number": dose.dose_number,
        "vaccinated_on": dose.vaccinated_on,
        "vaccine": dose.vaccine,
        "lot_number": dose.lot_number,
        "venue": dose.venue,
        "doctor": dose.doctor,
        "medical_worker": dose.medical_worker,
        "status": status.value,
        "findings": [f.as_dict(with_detail=True) for f in findings],
        "rules_version": rules.version,
        "resident_id": holder.resident_id if holder else None,
        "sex": holder.sex if holder else "U",
        "age_band": age_band(holder.birth_date if holder else None, dose.vaccinated_on).value,
        "age_band_10": age_band_10(holder.birth_date if holder else None, dose.vaccinated_on).value,
        "voided": False,
        "recorded_by": by,
        "recorded_at": now,
        "updated_at": now,
        "version": 1,
    }


def to_out(dose: Dose) -> DoseOut:
    """A dose as the issuing municipality sees it, findings in full."""
    return DoseOut(
        dose_id=dose.dose_id,
        municipality=dose.municipality_code,
        coupon_number=dose.coupon_number,
        dose_number=dose.dose_number,
        vaccinated_on=dose.vaccinated_on,
        vaccine=dose.vaccine,
        lot_number=dose.lot_number,
        venue=dose.venue,
        doctor=dose.doctor,
        medical_worker=dose.medical_worker,
        status=dose.status,
        findings=[FindingOut.model_validate(f) for f in dose.findings],
        matched=dose.resident_id is not None,
        voided=dose.voided,
        version=dose.version,
    )


async def list_doses(
    uow: UnitOfWork,
    *,
    municipality_code: str,
    status: DoseStatus | None,
    coupon_numbers: Sequence[str] = (),
    limit: int = 500,
) -> list[Dose]:
    repo = DoseRepository(await uow.for_municipality(municipality_code))
    if coupon_numbers:
        return await repo.of_coupons([(municipality_code, c) for c in coupon_numbers], with_voided=True)
    return await repo.of_municipality(municipality_code, status=status, limit=limit)


async def transfer_doses(uow: UnitOfWork, wanted: Sequence[tuple[str, Sequence[str]]]) -> list[Dose]:
    """Doses of (municipality, coupon numbers) pairs a transfer grant named: one query per shard."""
    by_shard: dict[str, list[tuple[str, str]]] = {}
    for municipality_code, numbers in wanted:
        shard = await uow.databases.shard_of(municipality_code)
        by_shard.setdefault(shard, []).extend((municipality_code, n) for n in numbers)
    doses: list[Dose] = []
    for shard, pairs in sorted(by_shard.items()):
        doses += await DoseRepository(uow.shard(shard)).of_coupons(pairs)
    return doses


async def dose_versions(uow: UnitOfWork, wanted: Mapping[str, str]) -> list[tuple[str, int, str, bool]]:
    """(dose id, version, status, voided) of the doses a dose-version grant named (dose id → municipality):
    one query per shard."""
    by_shard: dict[str, list[tuple[str, str]]] = {}
    for dose_id, municipality_code in wanted.items():
        shard = await uow.databases.shard_of(municipality_code)
        by_shard.setdefault(shard, []).append((municipality_code, dose_id))
    found: list[tuple[str, int, str, bool]] = []
    for shard, pairs in sorted(by_shard.items()):
        found += await DoseRepository(uow.shard(shard)).versions(pairs)
    return found


def _snapshot(dose: Dose) -> dict[str, Any]:
    """The dose as its issuing municipality reads it (:func:`to_out`, as JSON) and its statistics cell: built
    from the columns, whose findings were validated when they were stored (validating each again through
    pydantic was a third of the time of a coupon-event batch moving thousands of doses)."""
    return {
        "dose_id": dose.dose_id,
        "municipality": dose.municipality_code,
        "coupon_number": dose.coupon_number,
        "dose_number": dose.dose_number,
        "vaccinated_on": dose.vaccinated_on.isoformat(),
        "vaccine": dose.vaccine,
        "lot_number": dose.lot_number,
        "venue": dose.venue,
        "doctor": dose.doctor,
        "medical_worker": dose.medical_worker,
        "status": dose.status,
        "findings": [{"code": f["code"], "message": f["message"], "detail": f.get("detail")} for f in dose.findings],
        "matched": dose.resident_id is not None,
        "voided": dose.voided,
        "version": dose.version,
        "sex": dose.sex,
        "age_band": dose.age_band,
        "age_band_10": dose.age_band_10,
    }


def _history(dose: Dose, *, change: str, reason: str, by: str, at: datetime) -> dict[str, Any]:
    """The history row of a change to ``dose`` about to be made: who, why, and the dose before it."""
    return {
        "dose_id": dose.dose_id,
        "version": dose.version,
        "change": change,
        "reason": reason,
        "changed_by": by,
        "before": _snapshot(dose),
        "changed_at": at,
    }


async def coupon_status(uow: UnitOfWork, *, coupon_line: str, today: date) -> CouponStatusOut:
    try:
        coupon = parse_coupon_line(coupon_line)
    except CouponLineError as exc:
        raise InvalidField("coupon", str(exc)) from None
    session = await uow.for_municipality(coupon.municipality_code)
    known = await ProjectionRepository(session).get(coupon.municipality_code, coupon.coupon_number)
    validity = validity_of(known)
    return CouponStatusOut(
        coupon=coupon_line,
        registered=known is not None,
        valid=validity is None or today <= validity.valid_until,
    )


# --- coupon events -------------------------------------------------------------------------------------


async def apply_coupon_events(session: Any, events: Sequence[CouponEvent]) -> int:
    """Bring the projection and the doses of these coupons to the events' states, in the caller's transaction;
    how many coupon states changed. All of them, however many doses they move: see :func:`apply_coupon_messages`.
    """
    return (await apply_coupon_messages(session, [events])).changed


class AppliedCoupons(NamedTuple):
    changed: int  # coupon states changed
    taken: int  # of the messages given, the first this many were applied
    doses: int  # doses of the changed coupons read and locked


async def apply_coupon_messages(
    session: Any, messages: Sequence[Sequence[CouponEvent]], *, max_doses: int | None = None
) -> AppliedCoupons:
    """Apply the events of the first messages (each a sequence of events) in the caller's transaction: all of
    them, or, with ``max_doses``, as many as keep the doses this transaction locks within that number (at least
    one message, whatever it holds; the caller passes at most :data:`MAX_EVENTS` events, see
    ``services/records/consumer.py``).

    An event older than (or as old as) the projection's version changes nothing, so repeats and events out of
    order are harmless. A coupon whose holder is now known matches its unmatched doses; a holder whose sex or
    birth date changed moves the coupon's doses to the new cell; each moved dose gets a ``dose.matched`` or
    ``dose.corrected`` event, and its state before goes to ``dose_history``.

    The doses of a changing coupon are locked until the transaction commits, and a municipality correcting one
    of them waits that long. A real coupon has ten doses at most, but after a Kafka outage one batch may bring
    hundreds of coupons' changes: in make soak (hundreds of doses a coupon) one batch moved 15,500 doses and a
    correction waited 15 s. ``max_doses`` bounds that wait.
    """
    projection, doses = ProjectionRepository(session), DoseRepository(session)
    # The coupons as projected, locked (a bulk import announces its coupons a thousand to a message: one read
    # for the batch), and how many doses each coupon that may change has.
    newest = _newest(e for events in messages for e in events)
    current = await projection.get_many(list(newest), for_update=True)
    changing = {k for k, e in newest.items() if _changes(current.get(k), e)}
    on_file = await doses.count_of_coupons(sorted(changing))  # not locked: what the bound goes by
    taken = _within(messages, changing, on_file, max_doses)
    if taken < len(messages):
        newest = _newest(e for events in messages[:taken] for e in events)
    now = utcnow()
    changed: list[CouponProjection] = []
    for key, event in sorted(newest.items()):
        coupon = current.get(key)
        if not _changes(coupon, event):
            continue
        state = event.state
        if coupon is None:
            coupon = CouponProjection(municipality_code=event.municipality, coupon_number=event.coupon_number)
            projection.add(coupon)
        coupon.resident_id, coupon.sex, coupon.birth_date = state.resident_id, state.sex.value, state.birth_date
        coupon.invalid_from = state.invalid_from
        coupon.invalid_reason = state.invalid_reason.value if state.invalid_reason else None
        coupon.version, coupon.updated_at = event.version, now
        changed.append(coupon)
    if not changed:
        return AppliedCoupons(0, taken, 0)
    holders = {(c.municipality_code, c.coupon_number): c for c in changed}
    # The dose path's coupon locks, before the doses are read: a dose being written now is waited for and read
    # here; one written after finds the holder changed and is decided again (records_writes_as_read).
    await doses.lock_coupons(list(holders))
    history: list[dict[str, Any]] = []
    moved: list[DoseEvent] = []
    # The moves are written once, after them all: the doses' UPDATE one executemany (see DoseRepository.moved),
    # the history and the events one insert each.
    validities = {key: validity_of(coupon) for key, coupon in holders.items()}
    locked = await doses.of_coupons(list(holders), for_update=True)
    for dose in locked:
        key = (dose.municipality_code, dose.coupon_number)
        changed_dose, dose_event = _follow_coupon(holders[key], validities[key], dose, history, now=now)
        if changed_dose:
            doses.moved(dose)
        if dose_event is not None:
            moved.append(dose_event)
    await doses.add_history(history)
    await OutboxRepository(session, outbox).add(moved)
    return AppliedCoupons(len(changed), taken, len(locked))


def _newest(events: Iterable[CouponEvent]) -> dict[CouponKey, CouponEvent]:
    """The newest event of each coupon: only its state matters, its doses follow that."""
    newest: dict[CouponKey, CouponEvent] = {}
    for event in events:
        key = (event.municipality, event.coupon_number)
        if key not in newest or newest[key].version < event.version:
            newest[key] = event
    return newest


def _changes(coupon: CouponProjection | None, event: CouponEvent) -> bool:
    return coupon is None or coupon.version < event.version


# The events one bounded coupon-event transaction applies at most (whole messages: one over it goes alone; the
# consumer's handler takes no more). Each coupon it changes holds an advisory lock to the end of the
# transaction, in PostgreSQL's shared lock table (max_locks_per_transaction x max_connections slots: 19,200 on
# the test harness, 25,600 in production), which a bulk import's backlog (a thousand coupons a message, 500
# messages a poll) would fill.
MAX_EVENTS = 5000


def _within(
    messages: Sequence[Sequence[CouponEvent]],
    changing: set[CouponKey],
    on_file: Mapping[CouponKey, int],
    max_doses: int | None,
) -> int:
    """How many of the first messages to take so that the doses of the coupons they change (of ``changing``)
    stay within ``max_doses`` (at least one message; all of them when ``max_doses`` is None)."""
    if max_doses is None:
        return len(messages)
    counted: set[CouponKey] = set()
    doses = 0
    for taken, events in enumerate(messages):
        keys = ({(e.municipality, e.coupon_number) for e in events} & changing) - counted
        more = sum(on_file.get(k, 0) for k in keys)
        if taken and doses + more > max_doses:
            return taken
        doses += more
        counted |= keys
    return len(messages)


def _follow_coupon(
    coupon: CouponProjection,
    validity: CouponValidity | None,
    dose: Dose,
    history: list[dict[str, Any]],
    *,
    now: datetime,
) -> tuple[bool, DoseEvent | None]:
    """Bring ``dose`` to its coupon's state (its state before added to ``history``): the holder's cell, and
    review when the dose is dated after the coupon stopped being valid. Returns whether the dose changed, and
    its event when its cell moved (a finding alone changes no count)."""
    band = age_band(coupon.birth_date, dose.vaccinated_on).value
    band_10 = age_band_10(coupon.birth_date, dose.vaccinated_on).value
    moves = (dose.resident_id, dose.sex, dose.age_band, dose.age_band_10) != (
        coupon.resident_id,
        coupon.sex,
        band,
        band_10,
    )
    # A dose recorded while the projection did not yet know the coupon (unmatched) or its end (a move-out whose
    # event came later) was decided without it: held to it now, as it would have been then. Never twice.
    invalid = None if dose.voided or validity is None else _validity_findings_of(dose, validity)
    if not moves and not invalid:
        return False, None
    previous = cell_of(dose)
    was_unmatched = dose.resident_id is None
    change = "matched" if was_unmatched and moves else "corrected"
    history.append(_history(dose, change=change, reason="coupon event", by="registry", at=now))
    if moves:
        dose.resident_id, dose.sex, dose.age_band, dose.age_band_10 = coupon.resident_id, coupon.sex, band, band_10
    if invalid:
        dose.findings = [*dose.findings, *(f.as_dict(with_detail=True) for f in invalid)]
        dose.status = DoseStatus.NEEDS_REVIEW.value
    elif dose.status == DoseStatus.UNMATCHED and dose.resident_id is not None:
        dose.status = DoseStatus.RECORDED.value
    dose.version += 1
    dose.updated_at = now
    if not moves:
        return True, None
    return True, _event(DoseEventType.MATCHED if was_unmatched else DoseEventType.CORRECTED, dose, previous)


def _validity_findings_of(dose: Dose, validity: CouponValidity) -> list[Finding]:
    """The coupon_not_valid finding ``dose`` lacks, if its date is after ``validity`` ended."""
    if any(f["code"] == FindingCode.COUPON_NOT_VALID for f in dose.findings):
        return []
    return coupon_validity_findings(dose.vaccinated_on, validity)


# --- corrections ---------------------------------------------------------------------------------------

_CORRECTABLE = {"dose_number", "vaccinated_on", "vaccine", "lot_number", "venue", "doctor", "medical_worker"}


async def correct_dose(
    uow: UnitOfWork,
    *,
    principal: Principal,
    municipality_code: str,
    dose_id: str,
    correction: CorrectionIn,
    rules: VaccineRules,
    today: date,
) -> Dose:
    """Correct or void a dose of a coupon this municipality issued, keeping the state before in history.

    ``changes`` may also hold ``"reviewed": true``: a person checked the findings and the dose stands.
    """
    session = await uow.for_municipality(municipality_code)
    repo = DoseRepository(session)
    found = await repo.get(dose_id)
    if found is None or found.municipality_code != municipality_code:
        raise dose_not_found()
    # The coupon's lock before the dose's row, in the order the coupon consumer takes them: a dose being
    # recorded on this coupon is waited for and its siblings are read as they are (the findings below); and a
    # request deciding under the coupon's lock (locked_dose_path) is not refused by a correction committed
    # between its read and its write. A dose's coupon is never corrected: this is the lock to hold.
    await repo.lock_coupons([(found.municipality_code, found.coupon_number)])
    dose = await repo.get(dose_id, for_update=True)
    if dose is None:
        raise dose_not_found()
    if dose.voided:
        raise Conflict("dose is voided; it cannot be changed")
    previous = cell_of(dose)
    change = "voided" if correction.void else "corrected"
    await repo.add_history(
        [_history(dose, change=change, reason=correction.reason, by=principal.scope_key, at=utcnow())]
    )
    if correction.void:
        dose.voided = True
        kind = DoseEventType.VOIDED
    else:
        kind = DoseEventType.CORRECTED
        holder = await ProjectionRepository(session).get(dose.municipality_code, dose.coupon_number)
        await _apply_changes(dose, correction.changes or {}, repo, holder, rules=rules, today=today)
    dose.version += 1
    dose.updated_at = utcnow()
    await OutboxRepository(session, outbox).add([_event(kind, dose, previous)])
    return dose


def _corrected(dose: Dose, changes: dict[str, Any]) -> DoseIn:
    unknown = sorted(set(changes) - _CORRECTABLE)
    if unknown:
        raise InvalidField(
            f"changes.{unknown[0]}", f"cannot be corrected (correctable: {', '.join(sorted(_CORRECTABLE))})"
        )
    current = {
        "coupon": dose.coupon_line,
        "dose_number": dose.dose_number,
        "vaccinated_on": dose.vaccinated_on,
        "vaccine": dose.vaccine,
        "lot_number": dose.lot_number,
        "venue": dose.venue,
        "doctor": dose.doctor,
        "medical_worker": dose.medical_worker,
    }
    try:
        return DoseIn.model_validate({**current, **changes})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidField(f"changes.{'.'.join(str(p) for p in first['loc'])}", first["msg"]) from None


async def _apply_changes(
    dose: Dose,
    changes: dict[str, Any],
    repo: DoseRepository,
    holder: CouponProjection | None,
    *,
    rules: VaccineRules,
    today: date,
) -> None:
    reviewed = changes.pop("reviewed", False)
    if not isinstance(reviewed, bool):  # "false" is not false: a finding is never cleared by accident
        raise InvalidField("changes.reviewed", "must be true or false")
    corrected = _corrected(dose, changes)
    try:
        coupon = check_admissible(_facts(corrected), today=today, rules=rules)
    except DoseRejected as exc:
        raise InvalidField(f"changes.{exc.field}", exc.message) from None
    others = await repo.of_coupons([(dose.municipality_code, dose.coupon_number)])
    findings = (
        []
        if reviewed
        else review_findings(
            _facts(corrected),
            coupon,
            _earlier(others, excluding=dose.dose_id),
            rules=rules,
            validity=validity_of(holder),
        )
    )
    for name in _CORRECTABLE:
        setattr(dose, name, getattr(corrected, name))
    if holder is not None:
        # The age band depends on the date of the dose; the projection knows the birth date.
        dose.age_band = age_band(holder.birth_date, dose.vaccinated_on).value
        dose.age_band_10 = age_band_10(holder.birth_date, dose.vaccinated_on).value
    elif dose.resident_id is None:
        dose.age_band = AgeBand.UNKNOWN.value
        dose.age_band_10 = AgeBand10.UNKNOWN.value
    dose.findings = [f.as_dict(with_detail=True) for f in findings]
    dose.rules_version = rules.version
    dose.status = decide_status(findings, matched=dose.resident_id is not None).value


# --- dose CSV imports ----------------------------------------------------------------------------------

MAX_IMPORT_ERRORS = 1000  # kept per import; rows_failed counts them all


def import_not_found() -> NotFound:
    return NotFound("import not found")


async def start_import(uow: UnitOfWork, *, principal: Principal, content: bytes) -> str:
    """Store the file and queue it; the rows are recorded in the background (:func:`record_import_rows`).

    A file that cannot be read at all (no header, a required column missing) is refused now, with nothing
    stored; a bad row is that row's error in the import's results.
    """
    try:
        next(parse_dose_csv(io.BytesIO(content)), None)
    except CsvFileError as exc:
        raise InvalidField("file", str(exc)) from None
    now = utcnow()
    entry = DoseImport(
        import_id=str(uuid.uuid4()),
        scope=principal.scope_key,
        principal={
            "role": principal.role.value,
            "subject": principal.subject,
            "municipality": principal.municipality,
            "institution": principal.institution,
        },
        content=content,
        status="queued",
        next_row=2,
        rows_total=0,
        rows_ok=0,
        rows_failed=0,
        errors=[],
        lease_until=None,
        created_at=now,
        finished_at=None,
    )
    ImportRepository(uow.main()).add(entry)
    return str(entry.import_id)


async def import_status(uow: UnitOfWork, *, principal: Principal, import_id: str) -> DoseImport:
    """The import as its sender sees it; anyone else gets what an unknown id gets."""
    entry = await ImportRepository(uow.main()).get(import_id)
    if entry is None or entry.scope != principal.scope_key or entry.principal.get("subject") != principal.subject:
        raise import_not_found()
    return entry


def import_principal(entry: DoseImport) -> Principal:
    doc = entry.principal
    return Principal(
        role=Role(doc["role"]),
        subject=doc["subject"],
        municipality=doc.get("municipality"),
        institution=doc.get("institution"),
    )


async def record_import_rows(
    uow: UnitOfWork,
    *,
    import_id: str,
    rows: Sequence[Parsed[DoseRow]],
    rows_total: int,
    done: bool,
    rules: VaccineRules,
    today: date,
) -> DoseImport | None:
    """Record one chunk of an import's rows through the batch path, and its progress in the same unit of work.

    Progress commits after the doses (the shards commit first), so a crash in between replays the chunk,
    whose keys then replay their first answers: rows are never recorded or counted twice.
    """
    entry = await ImportRepository(uow.main()).get(import_id, for_update=True)
    if entry is None or entry.finished_at is not None:
        return entry
    failed: list[dict[str, Any]] = []
    submissions: list[tuple[int, Submission]] = []
    for row_number, parsed in rows:
        if isinstance(parsed, list):
            failed += [{"row": row_number, "field": e.field, "message": e.message} for e in parsed]
            entry.rows_failed += 1
            continue
        try:
            dose = DoseIn.model_validate(
                {
                    "coupon": parsed.coupon,
                    "dose_number": parsed.dose_number,
                    "vaccinated_on": parsed.vaccinated_on,
                    "vaccine": parsed.vaccine,
                    "lot_number": parsed.lot_number,
                    "venue": parsed.venue,
                    "doctor": parsed.doctor,
                    "medical_worker": parsed.medical_worker,
                }
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            failed.append({"row": row_number, "field": ".".join(str(p) for p in first["loc"]), "message": first["msg"]})
            entry.rows_failed += 1
            continue
        # The same key space as a batch item's client_id: a row sent again by batch (or the file again) is
        # the same dose, answered as first.
        submissions.append((row_number, Submission(key=f"batch:{parsed.client_id}", dose=dose, key_field="client_id")))
    outcomes = await record_doses(
        uow, principal=import_principal(entry), submissions=[s for _, s in submissions], rules=rules, today=today
    )
    for (row_number, _), outcome in zip(submissions, outcomes, strict=True):
        if outcome.error is None:
            entry.rows_ok += 1
            continue
        entry.rows_failed += 1
        error = outcome.error
        field = error.field if isinstance(error, InvalidField) else "client_id"
        message = error.message if isinstance(error, InvalidField) else error.detail.partition(": ")[2] or error.detail
        failed.append({"row": row_number, "field": field, "message": message})
    if failed and len(entry.errors) < MAX_IMPORT_ERRORS:
        entry.errors = [*entry.errors, *failed][:MAX_IMPORT_ERRORS]
    if rows:
        entry.next_row = rows[-1][0] + 1
    entry.rows_total = rows_total
    entry.status = "done" if done else "processing"
    if done:
        entry.finished_at = entry.lease_until = utcnow()
        entry.content = b""  # the file is not needed any more: only its counts and errors are read
    return entry
