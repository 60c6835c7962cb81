"""Records rules: ingest (single and batch, idempotent), the holder notice, corrections and voids.

Every change to a dose writes its event to the outbox in the same transaction, carrying the statistics
cell before and after, so stats moves exactly one count from the old cell to the new one.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from services.records.models import Dose, DoseHistory, IdempotencyKey
from services.records.registry_client import CouponHolders, CouponKey
from services.records.repository import DoseRepository, IdempotencyRepository, OutboxRepository
from services.records.schemas import CorrectionIn, DoseAccepted, DoseIn, DoseOut, FindingOut, HolderIn
from shared.auth import Principal
from shared.db import UnitOfWork, utcnow
from shared.domain.age import age_band
from shared.domain.coupon import CouponLine
from shared.domain.dose_rules import (
    DoseFacts,
    DoseRejected,
    DoseStatus,
    EarlierDose,
    Finding,
    check_admissible,
    decide_status,
    review_findings,
)
from shared.domain.vaccines import VaccineRules
from shared.errors import Conflict, InvalidField, NotFound, VRSError
from shared.events import DoseEvent, DoseEventType, StatsCell

JAPAN = ZoneInfo("Asia/Tokyo")


def japan_today() -> date:
    """Dates on coupons and tablets are Japanese calendar days: 'the future' starts at midnight JST."""
    return datetime.now(JAPAN).date()


def dose_not_found() -> NotFound:
    return NotFound("dose not found")


@dataclass(frozen=True, slots=True)
class Submission:
    key: str  # the idempotency key: the header for a single dose, the client_id in a batch
    dose: DoseIn


@dataclass(slots=True)
class Outcome:
    accepted: DoseAccepted | None = None
    error: VRSError | None = None


def request_hash(dose: DoseIn) -> str:
    canonical = json.dumps(dose.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
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
        medical_worker=dose.medical_worker,
        dose_number=dose.dose_number,
        vaccine=dose.vaccine,
    )


def _facts(dose: DoseIn) -> DoseFacts:
    return DoseFacts(
        coupon_line=dose.coupon, dose_number=dose.dose_number, vaccinated_on=dose.vaccinated_on, vaccine=dose.vaccine
    )


def _earlier(doses: Sequence[Dose], *, excluding: str | None = None) -> list[EarlierDose]:
    return [
        EarlierDose(dose_number=d.dose_number, vaccinated_on=d.vaccinated_on, vaccine=d.vaccine)
        for d in doses
        if d.dose_id != excluding and not d.voided
    ]


def _stored_findings(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    return [{"code": f.code, "message": f.message} for f in findings]


def _replay(stored: IdempotencyKey, dose: DoseIn) -> Outcome:
    if stored.request_hash != request_hash(dose):
        return Outcome(error=InvalidField("Idempotency-Key", "was already used for a different dose"))
    return Outcome(accepted=DoseAccepted.model_validate(stored.response))


def _emit(outbox: OutboxRepository, kind: DoseEventType, dose: Dose, previous: StatsCell | None) -> None:
    outbox.add(
        DoseEvent(
            type=kind,
            dose_id=uuid.UUID(dose.dose_id),
            municipality=dose.municipality_code,
            cell=cell_of(dose),
            previous_cell=previous,
        )
    )


async def record_doses(
    uow: UnitOfWork,
    holders: CouponHolders,
    *,
    principal: Principal,
    submissions: Sequence[Submission],
    rules: VaccineRules,
    today: date,
) -> list[Outcome]:
    """Record doses; one outcome per submission, in order. A repeated key replays the first answer."""
    outcomes = [Outcome() for _ in submissions]
    admissible: list[tuple[int, Submission, CouponLine]] = []
    for i, sub in enumerate(submissions):
        try:
            admissible.append((i, sub, check_admissible(_facts(sub.dose), today=today, rules=rules)))
        except DoseRejected as exc:
            outcomes[i].error = InvalidField(exc.field, exc.message)

    if not admissible:
        return outcomes
    # Ask registry first (one call for the whole batch, mostly cached), so that no database transaction is
    # held open across an HTTP call.
    found = await holders.lookup((c.municipality_code, c.coupon_number) for _, _, c in admissible)
    by_shard: dict[str, list[tuple[int, Submission, CouponLine]]] = defaultdict(list)
    for item in admissible:
        by_shard[await uow.databases.shard_of(item[2].municipality_code)].append(item)
    now = utcnow()
    for shard, items in by_shard.items():
        session = uow.shard(shard)
        doses, keys, outbox = DoseRepository(session), IdempotencyRepository(session), OutboxRepository(session)
        # Answer repeats first: a retry must not change anything.
        stored = await keys.get_many(principal.scope_key, [sub.key for _, sub, _ in items])
        fresh = []
        for i, sub, coupon in items:
            if sub.key in stored:
                outcomes[i] = _replay(stored[sub.key], sub.dose)
            else:
                fresh.append((i, sub, coupon))
        if not fresh:
            continue
        on_file: dict[CouponKey, list[Dose]] = defaultdict(list)
        for d in await doses.of_coupons(sorted({(c.municipality_code, c.coupon_number) for _, _, c in fresh})):
            on_file[(d.municipality_code, d.coupon_number)].append(d)
        prepared: list[tuple[int, Submission, Dose, DoseAccepted]] = []
        for i, sub, coupon in fresh:
            coupon_key = (coupon.municipality_code, coupon.coupon_number)
            holder = found.get(coupon_key)
            findings = review_findings(_facts(sub.dose), coupon, _earlier(on_file[coupon_key]), rules=rules)
            status = decide_status(findings, matched=holder is not None)
            dose = _new_dose(sub.dose, coupon, holder, status, findings, rules=rules, by=principal.scope_key, now=now)
            on_file[coupon_key].append(dose)  # a batch may carry dose 1 and dose 2 of one person
            accepted = DoseAccepted(
                dose_id=dose.dose_id,
                status=status.value,
                findings=[FindingOut(code=f.code, message=f.message) for f in findings],
            )
            prepared.append((i, sub, dose, accepted))
        claimed = await keys.claim(
            [
                IdempotencyKey(
                    scope=principal.scope_key,
                    key=sub.key,
                    request_hash=request_hash(sub.dose),
                    dose_id=dose.dose_id,
                    response=accepted.model_dump(mode="json"),
                    created_at=now,
                )
                for _, sub, dose, accepted in prepared
            ]
        )
        for i, sub, dose, accepted in prepared:
            if sub.key not in claimed:  # the same key arrived concurrently and won
                winner = await keys.get(principal.scope_key, sub.key)
                assert winner is not None
                outcomes[i] = _replay(winner, sub.dose)
                continue
            doses.add(dose)
            _emit(outbox, DoseEventType.RECORDED, dose, previous=None)
            outcomes[i] = Outcome(accepted=accepted)
    return outcomes


def _new_dose(
    dose: DoseIn,
    coupon: CouponLine,
    holder: HolderIn | None,
    status: DoseStatus,
    findings: Sequence[Finding],
    *,
    rules: VaccineRules,
    by: str,
    now: datetime,
) -> Dose:
    return Dose(
        dose_id=str(uuid.uuid4()),
        municipality_code=coupon.municipality_code,
        coupon_number=coupon.coupon_number,
        coupon_line=str(coupon),
        dose_number=dose.dose_number,
        vaccinated_on=dose.vaccinated_on,
        vaccine=dose.vaccine,
        lot_number=dose.lot_number,
        venue=dose.venue,
        doctor=dose.doctor,
        medical_worker=dose.medical_worker,
        status=status.value,
        findings=_stored_findings(findings),
        rules_version=rules.version,
        resident_id=holder.resident_id if holder else None,
        sex=holder.sex if holder else "U",
        age_band=age_band(holder.birth_date if holder else None, dose.vaccinated_on).value,
        voided=False,
        recorded_by=by,
        recorded_at=now,
        updated_at=now,
        version=1,
    )


def to_out(dose: Dose) -> DoseOut:
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
    uow: UnitOfWork, *, municipality_code: str, status: str | None, coupon_number: str | None = None, limit: int = 500
) -> list[Dose]:
    repo = DoseRepository(await uow.for_municipality(municipality_code))
    if coupon_number is not None:
        return await repo.of_coupons([(municipality_code, coupon_number)])
    return await repo.of_municipality(municipality_code, status=status, limit=limit)


def _snapshot(dose: Dose) -> dict[str, Any]:
    return to_out(dose).model_dump(mode="json") | {"sex": dose.sex, "age_band": dose.age_band}


def _record_history(repo: DoseRepository, dose: Dose, *, change: str, reason: str, by: str) -> None:
    repo.add_history(
        DoseHistory(
            dose_id=dose.dose_id,
            version=dose.version,
            change=change,
            reason=reason,
            changed_by=by,
            before=_snapshot(dose),
            changed_at=utcnow(),
        )
    )


async def apply_holder(
    uow: UnitOfWork, *, municipality_code: str, coupon_number: str, holder: HolderIn, by: str
) -> int:
    """A resident now holds this coupon: match its unmatched doses and re-cell the others if sex or birth
    date changed. Returns how many doses changed."""
    session = await uow.for_municipality(municipality_code)
    repo, outbox = DoseRepository(session), OutboxRepository(session)
    changed = 0
    for dose in await repo.of_coupons([(municipality_code, coupon_number)], for_update=True):
        previous = cell_of(dose)
        new_band = age_band(holder.birth_date, dose.vaccinated_on).value
        if (dose.resident_id, dose.sex, dose.age_band) == (holder.resident_id, holder.sex, new_band):
            continue
        was_unmatched = dose.resident_id is None
        _record_history(repo, dose, change="matched" if was_unmatched else "corrected", reason="registry", by=by)
        dose.resident_id, dose.sex, dose.age_band = holder.resident_id, holder.sex, new_band
        if dose.status == DoseStatus.UNMATCHED:
            dose.status = DoseStatus.RECORDED.value
        dose.version += 1
        dose.updated_at = utcnow()
        _emit(outbox, DoseEventType.MATCHED if was_unmatched else DoseEventType.CORRECTED, dose, previous)
        changed += 1
    return changed


_CORRECTABLE = {"dose_number", "vaccinated_on", "vaccine", "lot_number", "venue", "doctor", "medical_worker"}


async def correct_dose(
    uow: UnitOfWork,
    holders: CouponHolders,
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
    repo, outbox = DoseRepository(session), OutboxRepository(session)
    dose = await repo.get(dose_id, for_update=True)
    if dose is None or dose.municipality_code != municipality_code:
        raise dose_not_found()
    if dose.voided:
        raise Conflict("dose is voided; it cannot be changed")
    previous = cell_of(dose)
    _record_history(
        repo,
        dose,
        change="voided" if correction.void else "corrected",
        reason=correction.reason,
        by=principal.scope_key,
    )
    if correction.void:
        dose.voided = True
        kind = DoseEventType.VOIDED
    else:
        kind = DoseEventType.CORRECTED
        await _apply_changes(dose, correction.changes or {}, repo, holders, rules=rules, today=today)
    dose.version += 1
    dose.updated_at = utcnow()
    _emit(outbox, kind, dose, previous)
    return dose


async def _apply_changes(
    dose: Dose,
    changes: dict[str, Any],
    repo: DoseRepository,
    holders: CouponHolders,
    *,
    rules: VaccineRules,
    today: date,
) -> None:
    reviewed = bool(changes.pop("reviewed", False))
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
        corrected = DoseIn.model_validate({**current, **changes})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidField(f"changes.{'.'.join(str(p) for p in first['loc'])}", first["msg"]) from None
    try:
        coupon = check_admissible(_facts(corrected), today=today, rules=rules)
    except DoseRejected as exc:
        raise InvalidField(f"changes.{exc.field}", exc.message) from None
    others = await repo.of_coupons([(dose.municipality_code, dose.coupon_number)])
    findings = (
        []
        if reviewed
        else review_findings(_facts(corrected), coupon, _earlier(others, excluding=dose.dose_id), rules=rules)
    )
    for name in _CORRECTABLE:
        setattr(dose, name, getattr(corrected, name))
    if dose.resident_id is not None and dose.age_band != "UNK":
        # The age band depends on the date; only registry knows the birth date.
        holder = (await holders.lookup([(dose.municipality_code, dose.coupon_number)])).get(
            (dose.municipality_code, dose.coupon_number)
        )
        if holder is not None:
            dose.age_band = age_band(holder.birth_date, dose.vaccinated_on).value
    dose.findings = _stored_findings(findings)
    dose.rules_version = rules.version
    dose.status = decide_status(findings, matched=dose.resident_id is not None).value
