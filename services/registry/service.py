"""Registry rules: registering residents, announcing their coupons, composing a resident with doses.

Every change that matters to records — a coupon issued, its holder's sex or birth date changed, a coupon no
longer valid — is written as a coupon event to registry's outbox in the same transaction as the change.
Registry never calls records to tell it anything; it only reads from records on a caller's behalf.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal, Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.registry.bulk import PreparedChunk, outbox_copy
from services.registry.crypto import MyNumberVault
from services.registry.models import Coupon, Resident, TransferDisclosure
from services.registry.repository import (
    CouponRepository,
    DirectoryRepository,
    DisclosureRepository,
    ResidentRepository,
)
from services.registry.schemas import (
    AUTO,
    DisclosureOut,
    DisclosuresOut,
    MunicipalityDisclosureOut,
    MunicipalityDisclosuresOut,
    ResidentIn,
    ResidentOut,
    ResidentWithDoses,
    TransferDose,
)
from shared.db import UnitOfWork, utcnow
from shared.domain.codes import mask_my_number
from shared.domain.coupon import candidate_coupon_numbers, compose_coupon_line
from shared.domain.csv_stream import RowError
from shared.domain.japan_time import japan_today
from shared.domain.resident_csv import ResidentRow
from shared.domain.sex import Sex
from shared.errors import Conflict, InvalidField, ServiceUnavailable, resident_not_found
from shared.events import CouponEvent, CouponEventType, CouponInvalidReason, CouponState
from shared.grants import TransferGrant, sign_grant
from shared.internal import InternalClient
from shared.schemas import DoseSummary

log = logging.getLogger(__name__)


COUPON_KIND = 1  # 券種 as printed on the coupons registry issues
MAX_DISCLOSURES = 1000  # a resident's disclosures in one answer: the newest


def coupon_line(municipality_code: str, coupon_number: str | None) -> str | None:
    if coupon_number is None:
        return None
    return compose_coupon_line(
        kind=COUPON_KIND, dose_number=0, municipality_code=municipality_code, coupon_number=coupon_number
    )


def to_out(resident: Resident) -> ResidentOut:
    return ResidentOut(
        municipality=resident.municipality_code,
        resident_id=resident.resident_id,
        name=resident.name,
        name_kana=resident.name_kana,
        birth_date=resident.birth_date,
        sex=resident.sex,
        my_number=mask_my_number(resident.my_number_last4) if resident.my_number_last4 else None,
        address=resident.address,
        coupon_number=resident.coupon_number,
        coupon_line=coupon_line(resident.municipality_code, resident.coupon_number),
        moved_to=resident.moved_to,
        moved_on=resident.moved_on,
        created_at=resident.created_at,
        updated_at=resident.updated_at,
    )


def my_number_taken(other_resident_id: str) -> str:
    return f"this My Number is registered to another resident of this municipality ({other_resident_id})"


async def put_resident(
    uow: UnitOfWork,
    vault: MyNumberVault,
    *,
    municipality_code: str,
    resident_id: str,
    data: ResidentIn,
    changed_by: str = "unknown",
) -> tuple[Resident, bool]:
    """Create or replace a resident; returns (resident, created). Repeating the same PUT changes nothing."""
    session = await uow.for_municipality(municipality_code)
    residents, coupons = ResidentRepository(session), CouponRepository(session)
    directory = DirectoryRepository(uow.main())
    resident = await residents.get(municipality_code, resident_id, for_update=True)
    created = resident is None
    now = utcnow()
    if resident is None:
        resident = Resident(municipality_code=municipality_code, resident_id=resident_id, created_at=now, version=0)
        residents.add(resident)
    before = None if created else snapshot(resident)
    old_hash = resident.my_number_hash
    if data.my_number is not None:
        # One person, one resident per municipality: a second id for the same number is a mistake to fix
        # at the source, not a reason to repoint the directory.
        holders = await directory.holders(municipality_code, [vault.keyed_hash(data.my_number)])
        holder = next(iter(holders.values()), resident_id)
        if holder != resident_id:
            raise Conflict(f"my_number: {my_number_taken(holder)}")

    if data.coupon_number == AUTO:
        number = resident.coupon_number or await allocate_coupon_number(coupons, municipality_code)
        data = data.model_copy(update={"coupon_number": number})
    if data.coupon_number is not None and data.coupon_number != resident.coupon_number:
        # Issued numbers are never handed to somebody else, not even after they stopped being valid.
        issued = await coupons.get(municipality_code, data.coupon_number, for_update=True)
        if issued is not None and issued.resident_id != resident_id:
            raise Conflict("coupon_number: this coupon number was issued to another resident")

    changed = _apply(resident, data)
    if data.my_number is not None:
        if old_hash is None or vault.keyed_hash(data.my_number) != old_hash:
            sealed = vault.seal(data.my_number, context=f"{municipality_code}/{resident_id}")
            resident.my_number_key_id = sealed.key_id
            resident.my_number_ciphertext = sealed.ciphertext
            resident.my_number_hash = sealed.keyed_hash
            resident.my_number_last4 = sealed.last4
            changed = True
    elif old_hash is not None:
        resident.my_number_key_id = resident.my_number_ciphertext = None
        resident.my_number_hash = resident.my_number_last4 = None
        changed = True
    if changed or created:
        resident.updated_at = now
        resident.version = (resident.version or 0) + 1
        residents.add_history([history_row(resident, before, changed_by=changed_by, at=now)])
    try:
        await residents.flush()
    except IntegrityError:
        # Two concurrent PUTs: the loser's retry will see the winner's row.
        raise Conflict("resident changed concurrently; retry the request") from None

    if old_hash is not None and old_hash != resident.my_number_hash:
        await directory.remove(old_hash, municipality_code)
    if resident.my_number_hash is not None and not await directory.claim(
        [(resident.my_number_hash, resident_id)], municipality_code
    ):
        raise Conflict("my_number: another resident was just registered with this My Number; retry")
    await announce_coupons(coupons, resident, today=japan_today())
    return resident, created


# What a resident's history records; the My Number only as "changed" and its last four digits.
TRACKED = ("name", "name_kana", "birth_date", "sex", "address", "coupon_number", "moved_to", "moved_on")


def _getter(resident: Any) -> Callable[[str], Any]:
    # ``type(...) is dict`` first: the ``Mapping`` ABC check is slow, and an import asks it for every row.
    if type(resident) is dict or isinstance(resident, Mapping):
        return resident.get
    return lambda name: getattr(resident, name, None)


def snapshot(resident: Any) -> dict[str, Any]:
    """The tracked fields of ``resident`` (an ORM row or a mapping), plus the My Number's hash and last 4."""
    get = _getter(resident)
    values = {name: get(name) for name in TRACKED}
    values["my_number_hash"], values["my_number_last4"] = get("my_number_hash"), get("my_number_last4")
    return values


def history_changes(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> dict[str, Any]:
    """``{field: {"before", "after"}}`` for each tracked field that differs; JSON-ready."""
    old_values: Mapping[str, Any] = before or {}
    changes: dict[str, Any] = {}
    for name in TRACKED:
        old, new = old_values.get(name), after.get(name)
        if old != new:
            # Inline, not a helper per value: an import builds this for every row.
            changes[name] = {
                "before": old.isoformat() if isinstance(old, date) else old,
                "after": new.isoformat() if isinstance(new, date) else new,
            }
    if old_values.get("my_number_hash") != after.get("my_number_hash"):
        changes["my_number"] = {"changed": True, "last4": after.get("my_number_last4")}
    return changes


def history_row(resident: Any, before: Mapping[str, Any] | None, *, changed_by: str, at: datetime) -> dict[str, Any]:
    get = _getter(resident)
    return {
        "municipality_code": get("municipality_code"),
        "resident_id": get("resident_id"),
        "version": get("version"),
        "changed_by": changed_by,
        "changed_at": at,
        "changes": history_changes(before, snapshot(resident)),
    }


class CouponLike(Protocol):
    """What coupon planning reads and writes: a ``Coupon`` row or an import's :class:`CouponRow`."""

    municipality_code: str
    coupon_number: str
    resident_id: str
    sex: str
    birth_date: date | None
    invalid_from: date | None
    invalid_reason: str | None
    version: int
    created_at: datetime
    updated_at: datetime


class HolderLike(Protocol):
    @property
    def municipality_code(self) -> str: ...
    @property
    def resident_id(self) -> str: ...
    @property
    def sex(self) -> str: ...
    @property
    def birth_date(self) -> date | None: ...
    @property
    def coupon_number(self) -> str | None: ...
    @property
    def moved_on(self) -> date | None: ...


@dataclass(slots=True)
class CouponRow:
    municipality_code: str
    coupon_number: str
    resident_id: str
    version: int
    created_at: datetime
    updated_at: datetime
    sex: str = "U"
    birth_date: date | None = None
    invalid_from: date | None = None
    invalid_reason: str | None = None


def _desired_state(coupon: CouponLike, resident: HolderLike, *, today: date) -> CouponState:
    """What records should know of ``coupon`` now: its holder's cell attributes and its validity."""
    if resident.moved_on is not None and (
        coupon.invalid_from is None or coupon.invalid_reason == CouponInvalidReason.MOVED_OUT.value
    ):
        # 転出: every coupon still valid ends with the moving day (records keeps that day valid).
        invalid_from, reason = resident.moved_on, CouponInvalidReason.MOVED_OUT
    elif coupon.coupon_number == resident.coupon_number:
        invalid_from, reason = None, None
    elif coupon.invalid_from is not None and coupon.invalid_reason != CouponInvalidReason.MOVED_OUT.value:
        invalid_from, reason = coupon.invalid_from, CouponInvalidReason(str(coupon.invalid_reason))
    else:  # replaced by a new number, or withdrawn without one
        invalid_from = today
        reason = CouponInvalidReason.REISSUED if resident.coupon_number else CouponInvalidReason.VOIDED
    return CouponState(
        resident_id=resident.resident_id,
        sex=Sex(resident.sex),
        birth_date=resident.birth_date,
        invalid_from=invalid_from,
        invalid_reason=reason,
    )


def _event_type(coupon: CouponLike, state: CouponState) -> CouponEventType:
    if coupon.version == 0 or (coupon.invalid_from is not None and state.invalid_from is None):
        return CouponEventType.ISSUED
    if state.invalid_from is not None and coupon.invalid_from != state.invalid_from:
        return CouponEventType.INVALIDATED
    return CouponEventType.HOLDER_CHANGED


def plan_coupons(
    rows: dict[str, Any], resident: HolderLike, *, today: date, now: datetime, new: Callable[[str], CouponLike]
) -> list[CouponEvent]:
    """Bring ``rows`` (every coupon of ``resident`` by number; ``new(number)`` makes a missing one) to the
    state the resident's record implies, in place; one event for each coupon whose announced state changes.

    Idempotent: a coupon whose announced state already matches gets no event, so repeating a PUT (or an
    import row) publishes nothing. Old coupons follow the holder's sex and birth date too: doses recorded on
    them belong to the same person and must move to the same statistics cell.
    """
    municipality = resident.municipality_code
    if resident.coupon_number is not None and resident.coupon_number not in rows:
        rows[resident.coupon_number] = new(resident.coupon_number)
    events = []
    for number, coupon in sorted(rows.items()):
        state = _desired_state(coupon, resident, today=today)
        announced = (coupon.sex, coupon.birth_date, coupon.invalid_from, coupon.invalid_reason)
        reason = state.invalid_reason.value if state.invalid_reason else None
        if coupon.version and announced == (state.sex.value, state.birth_date, state.invalid_from, reason):
            continue
        kind = _event_type(coupon, state)
        coupon.sex, coupon.birth_date = state.sex.value, state.birth_date
        coupon.invalid_from, coupon.invalid_reason = state.invalid_from, reason
        coupon.version += 1
        coupon.updated_at = now
        events.append(
            CouponEvent(
                type=kind,
                municipality=municipality,
                coupon_number=number,
                version=coupon.version,
                state=state,
                occurred_at=now,
            )
        )
    return events


async def announce_coupons(coupons: CouponRepository, resident: Resident, *, today: date) -> list[CouponEvent]:
    """Bring every coupon of ``resident`` to the state its record implies (see :func:`plan_coupons`), with
    the coupon events written to the outbox in the caller's transaction."""
    municipality, now = resident.municipality_code, utcnow()

    def new(number: str) -> Coupon:
        fresh = Coupon(
            municipality_code=municipality,
            coupon_number=number,
            resident_id=resident.resident_id,
            version=0,
            created_at=now,
        )
        coupons.add(fresh)
        return fresh

    rows: dict[str, Any] = {
        c.coupon_number: c for c in await coupons.of_resident(municipality, resident.resident_id, for_update=True)
    }
    events = plan_coupons(rows, resident, today=today, now=now, new=new)
    await coupons.announce(events)
    return events


def _apply(resident: Resident, data: ResidentIn) -> bool:
    fields: dict[str, Any] = {
        "name": data.name,
        "name_kana": data.name_kana,
        "birth_date": data.birth_date,
        "sex": data.sex,
        "address": data.address,
        "coupon_number": data.coupon_number,
    }
    changed = False
    for name, value in fields.items():
        if getattr(resident, name, None) != value:
            setattr(resident, name, value)
            changed = True
    return changed


async def get_resident(uow: UnitOfWork, *, municipality_code: str, resident_id: str) -> Resident:
    resident = await ResidentRepository(await uow.for_municipality(municipality_code)).get(
        municipality_code, resident_id
    )
    if resident is None:
        raise resident_not_found()
    return resident


async def resident_with_doses(uow: UnitOfWork, resident: Resident, records: InternalClient) -> ResidentWithDoses:
    """The resident with the doses recorded on any coupon they were issued, read from records as the caller
    (the caller's internal token is forwarded): registry holds no credential of its own for records."""
    numbers = [
        c.coupon_number
        for c in await CouponRepository(await uow.for_municipality(resident.municipality_code)).of_resident(
            resident.municipality_code, resident.resident_id
        )
    ]
    doses: list[DoseSummary] = []
    if numbers:
        status, body = await records.request(
            "GET",
            f"/internal/v1/municipalities/{resident.municipality_code}/doses",
            params={"coupon_number": ",".join(numbers)},
        )
        if status != 200:
            raise ServiceUnavailable(f"records answered {status} for the resident's doses")
        doses = [DoseSummary.model_validate(d) for d in body["doses"]]
    return ResidentWithDoses(**to_out(resident).model_dump(), doses=doses)


# --- bulk import -------------------------------------------------------------------------------------------

_RESIDENT_FIELDS = ("name", "name_kana", "birth_date", "sex", "address", "coupon_number")


@dataclass(slots=True)
class _Holder:
    municipality_code: str
    resident_id: str
    sex: str
    birth_date: date | None
    coupon_number: str | None
    moved_on: date | None


@dataclass(slots=True)
class BatchResult:
    ok: int
    errors: list[tuple[int, list[RowError]]]
    changed: int


async def import_rows(
    shard: AsyncSession,
    main: AsyncSession,
    vault: MyNumberVault,
    *,
    municipality_code: str,
    rows: Sequence[tuple[int, ResidentRow]],
    changed_by: str,
    today: date,
) -> BatchResult:
    """Upsert a batch of parsed resident rows exactly as the ``PUT`` would, in a few multi-row statements.

    A row that repeats what is stored changes nothing (no version, no history, no event). A row whose My
    Number another resident of the municipality holds, or whose coupon number was issued to another
    resident, is a row error; the rest of the batch is stored. Nothing is committed here.
    """
    residents, coupons, directory = ResidentRepository(shard), CouponRepository(shard), DirectoryRepository(main)
    now = utcnow()
    existing = await residents.states(municipality_code, [r.resident_id for _, r in rows])
    hashes = {n: vault.keyed_hash(r.my_number) for n, r in rows if r.my_number is not None}
    holders = await directory.holders(municipality_code, list(hashes.values()))
    issued = await coupons.issued_to(municipality_code, [r.coupon_number for _, r in rows if r.coupon_number])

    errors: list[tuple[int, list[RowError]]] = []
    upserts: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    claims: list[tuple[bytes, str]] = []
    released: list[bytes] = []
    ok = 0
    for n, row in rows:
        problems = []
        h = hashes.get(n)
        if h is not None and holders.get(h, row.resident_id) != row.resident_id:
            problems.append(RowError("my_number", my_number_taken(holders[h])))
        if row.coupon_number and issued.get(row.coupon_number, row.resident_id) != row.resident_id:
            problems.append(RowError("coupon_number", "this coupon number was issued to another resident"))
        if problems:
            errors.append((n, problems))
            continue
        ok += 1
        before = existing.get(row.resident_id)
        after: dict[str, Any] = {name: getattr(row, name) for name in _RESIDENT_FIELDS}
        after["sex"] = row.sex.value
        if h is None:
            after |= {"my_number_key_id": None, "my_number_ciphertext": None, "my_number_hash": None}
            after["my_number_last4"] = None
        elif before is not None and before["my_number_hash"] == h:
            after |= {k: before[k] for k in ("my_number_key_id", "my_number_ciphertext", "my_number_hash")}
            after["my_number_last4"] = before["my_number_last4"]
        else:
            sealed = vault.seal(str(row.my_number), context=f"{municipality_code}/{row.resident_id}", keyed_hash=h)
            after |= {"my_number_key_id": sealed.key_id, "my_number_ciphertext": sealed.ciphertext}
            after |= {"my_number_hash": sealed.keyed_hash, "my_number_last4": sealed.last4}
        if before is not None and all(before[k] == after[k] for k in after if k != "my_number_ciphertext"):
            if h is not None and h not in holders:
                # Stored by a batch whose shard committed and whose directory commit was lost (a crash between
                # the two): the resumed import repairs the entry.
                claims.append((h, row.resident_id))
            continue  # the same as stored: the same file twice changes nothing
        after |= {"municipality_code": municipality_code, "resident_id": row.resident_id, "updated_at": now}
        after["version"] = (before["version"] if before else 0) + 1
        after["created_at"] = before["created_at"] if before else now
        after["moved_to"] = before["moved_to"] if before else None
        after["moved_on"] = before["moved_on"] if before else None
        upserts.append(after)
        history.append(history_row(after, before, changed_by=changed_by, at=now))
        if before is not None and before["my_number_hash"] not in (None, h):
            released.append(before["my_number_hash"])
        if h is not None:
            claims.append((h, row.resident_id))

    if upserts:
        await residents.upsert_many(upserts)
        await residents.insert_history(history)
        events = await _plan_import_coupons(coupons, municipality_code, upserts, today=today, now=now)
        await coupons.announce(events)
    if released:
        await directory.remove_many(released, municipality_code)
    if claims and not await directory.claim(claims, municipality_code):
        # Another writer registered one of these numbers between our read and write: redo the batch.
        raise Conflict("my_number: a My Number of this batch was just registered to another resident")
    return BatchResult(ok=ok, errors=errors, changed=len(upserts))


async def import_prepared(
    shard: AsyncSession,
    main: AsyncSession,
    vault: MyNumberVault,
    *,
    municipality_code: str,
    chunk: PreparedChunk,
    good: Sequence[int],
    row_of: Callable[[int], ResidentRow],
    changed_by: str,
    today: date,
    direct: bool = True,
    checked: bool = True,
) -> BatchResult:
    """Store the good rows (indexes into ``chunk``) of a bulk import's prepared chunk, as :func:`import_rows`
    would. A row of a resident the municipality has never seen, whose My Number and coupon number nobody holds,
    is copied as prepared (``direct``); any other row — the resident is known, or their number or coupon is
    (some trace of them) — is rebuilt (``row_of``) and goes through :func:`import_rows`. A writer that
    stores one of the new keys between the checks and the copies makes it a :class:`Conflict` (the caller
    redoes the chunk with ``direct=False``). Unless ``checked``, every good row is taken for new and copied: a
    row that is not makes the copy a :class:`Conflict` too (its keys are the tables' unique keys)."""
    careful: list[int] = list(good) if not direct else []
    fresh: list[int] = list(good) if direct and not checked else []
    errors: list[tuple[int, list[RowError]]] = []
    if direct and checked and good:
        residents, coupons = ResidentRepository(shard), CouponRepository(shard)
        known = await residents.known(municipality_code, [str(chunk.resident_ids[i]) for i in good])
        holders = await DirectoryRepository(main).holders(
            municipality_code, [h for i in good if (h := chunk.hashes[i]) is not None]
        )
        issued = await coupons.issued_to(municipality_code, [c for i in good if (c := chunk.coupons[i]) is not None])
        for i in good:
            resident_id = chunk.resident_ids[i]
            h, number = chunk.hashes[i], chunk.coupons[i]
            holder = holders.get(h) if h is not None else None
            owner = issued.get(number) if number is not None else None
            if resident_id in known or resident_id in (holder, owner):
                careful.append(i)
                continue
            problems = []
            if holder is not None:
                problems.append(RowError("my_number", my_number_taken(holder)))
            if owner is not None:
                problems.append(RowError("coupon_number", "this coupon number was issued to another resident"))
            if problems:
                errors.append((chunk.numbers[i], problems))
            else:
                fresh.append(i)
    ok = changed = 0
    if careful:
        result = await import_rows(
            shard,
            main,
            vault,
            municipality_code=municipality_code,
            rows=[(chunk.numbers[i], row_of(i)) for i in careful],
            changed_by=changed_by,
            today=today,
        )
        ok, changed, errors = result.ok, result.changed, errors + result.errors
    if fresh:
        # Two connections, two PostgreSQL backends: the directory's COPY runs beside the shard's four. Both
        # end before a failure of either is raised (the caller then rolls both sessions back).
        done = await asyncio.gather(
            ResidentRepository(shard).copy_new(
                chunk.residents.take(fresh),
                chunk.coupon_lines.take(fresh),
                chunk.history.take(fresh),
                outbox_copy(municipality_code, chunk.outbox.pieces(fresh), chunk.now),
            ),
            DirectoryRepository(main).copy_new(chunk.directory.take(fresh)),
            return_exceptions=True,
        )
        for failed in done:
            if isinstance(failed, BaseException):
                raise failed
        ok, changed = ok + len(fresh), changed + len(fresh)
    return BatchResult(ok=ok, errors=sorted(errors, key=lambda e: e[0]), changed=changed)


async def _plan_import_coupons(
    coupons: CouponRepository, municipality_code: str, residents: list[dict[str, Any]], *, today: date, now: datetime
) -> list[CouponEvent]:
    by_resident: dict[str, dict[str, Any]] = {r["resident_id"]: {} for r in residents}
    for values in await coupons.rows_of_residents(municipality_code, list(by_resident)):
        c = CouponRow(**values)
        by_resident[c.resident_id][c.coupon_number] = c
    events: list[CouponEvent] = []
    touched: list[CouponRow] = []
    for r in residents:
        rows = by_resident[r["resident_id"]]
        before = {n: c.version for n, c in rows.items()}
        holder = _Holder(
            municipality_code, r["resident_id"], r["sex"], r["birth_date"], r["coupon_number"], r["moved_on"]
        )

        def new(number: str, resident_id: str = r["resident_id"]) -> CouponRow:
            return CouponRow(municipality_code, number, resident_id, version=0, created_at=now, updated_at=now)

        events += plan_coupons(rows, holder, today=today, now=now, new=new)
        touched += [c for n, c in rows.items() if c.version != before.get(n)]
    await coupons.upsert_rows(touched)
    return events


async def move_out(
    uow: UnitOfWork, *, municipality_code: str, resident_id: str, moved_to: str, moved_on: date, changed_by: str
) -> Resident:
    """転出: keep the record, note where and when, and end every coupon's validity with the moving day
    (``coupon.invalidated``, reason ``moved_out``). The same request again changes nothing."""
    if moved_to == municipality_code:
        raise InvalidField("moved_to", "is this municipality: a move within it is an address change (PUT)")
    session = await uow.for_municipality(municipality_code)
    residents = ResidentRepository(session)
    resident = await residents.get(municipality_code, resident_id, for_update=True)
    if resident is None:
        raise resident_not_found()
    before = snapshot(resident)
    if (resident.moved_to, resident.moved_on) != (moved_to, moved_on):
        now = utcnow()
        resident.moved_to, resident.moved_on = moved_to, moved_on
        resident.version += 1
        resident.updated_at = now
        residents.add_history([history_row(resident, before, changed_by=changed_by, at=now)])
        await residents.flush()
    await announce_coupons(CouponRepository(session), resident, today=japan_today())
    return resident


# --- transfer lookups --------------------------------------------------------------------------------------


async def transfer_lookups(
    uow: UnitOfWork,
    vault: MyNumberVault,
    records: InternalClient,
    *,
    caller: str,
    lookups: Sequence[tuple[str, str]],
    grant_key: str,
    request_id: str,
) -> list[list[TransferDose]]:
    """For each (My Number, legal basis): the doses recorded under the other municipalities the person is
    or was registered in — only if they are now registered (not moved out) in ``caller``; otherwise no
    doses, exactly as for a number nobody registered. One directory query, one query per shard, one
    records call (as the caller: its internal token is forwarded) carrying one signed grant per municipality
    (see :mod:`shared.grants`). What was read is logged (:func:`log_disclosures`) in the caller's transaction:
    a lookup whose log cannot be written fails rather than answer unlogged."""
    hashes = [vault.keyed_hash(number) for number, _ in lookups]
    entries = await DirectoryRepository(uow.main()).entries(hashes)
    here = {h: r for h, m, r in entries if m == caller}
    present = await ResidentRepository(await uow.for_municipality(caller)).present(caller, list(set(here.values())))
    eligible = {h for h, r in here.items() if r in present}
    elsewhere: dict[bytes, list[tuple[str, str]]] = {}
    for h, municipality, resident in entries:
        if h in eligible and municipality != caller:
            elsewhere.setdefault(h, []).append((municipality, resident))
    by_shard: dict[str, list[tuple[str, str]]] = {}
    shards = await uow.databases.shards_of(m for pairs in elsewhere.values() for m, _ in pairs)
    for pairs in elsewhere.values():
        for municipality, resident in pairs:
            by_shard.setdefault(shards[municipality], []).append((municipality, resident))
    coupons: dict[tuple[str, str], list[str]] = {}
    for shard, pairs in sorted(by_shard.items()):
        coupons |= await CouponRepository(uow.shard(shard)).numbers_of(sorted(set(pairs)))

    wanted: dict[str, set[str]] = {}
    bases: dict[str, set[str]] = {}
    for i, h in enumerate(hashes):
        for municipality, resident in elsewhere.get(h, []):
            wanted.setdefault(municipality, set()).update(coupons.get((municipality, resident), []))
            bases.setdefault(municipality, set()).add(lookups[i][1])
    grants = [
        sign_grant(
            grant_key,
            TransferGrant(
                caller=caller,
                legal_basis=sorted(bases[m]),
                municipality=m,
                coupons=sorted(numbers),
            ),
        )
        for m, numbers in sorted(wanted.items())
        if numbers
    ]
    found: dict[tuple[str, str], list[TransferDose]] = {}
    if grants:
        status, body = await records.request("POST", "/internal/v1/transfer-doses", json={"grants": grants})
        if status != 200:
            raise ServiceUnavailable(f"records answered {status} for a transfer lookup")
        for d in body["doses"]:
            dose = DoseSummary.model_validate(d)
            found.setdefault((dose.municipality, dose.coupon_number), []).append(
                TransferDose(
                    municipality=dose.municipality,
                    dose_number=dose.dose_number,
                    vaccinated_on=dose.vaccinated_on,
                    vaccine=dose.vaccine,
                    lot_number=dose.lot_number,
                )
            )
    answers, disclosed = [], []
    for h, (_, basis) in zip(hashes, lookups, strict=True):
        doses = []
        for municipality, resident in elsewhere.get(h, []):
            shown = [
                dose
                for number in coupons.get((municipality, resident), [])
                for dose in found.get((municipality, number), [])
            ]
            disclosed.append((here[h], municipality, resident, basis, len(shown)))
            doses += shown
        answers.append(sorted(doses, key=lambda d: (d.vaccinated_on, d.dose_number)))
    await log_disclosures(uow, caller=caller, request_id=request_id, disclosed=disclosed)
    return answers


async def log_disclosures(
    uow: UnitOfWork, *, caller: str, request_id: str, disclosed: Sequence[tuple[str, str, str, str, int]]
) -> None:
    """情報提供等記録: for each lookup item and other municipality read, (the caller's resident id, that
    municipality, its resident id, the legal basis, the doses shown), one statement for the whole lookup. A
    municipality that showed no dose is logged too: its records of the person were read for the caller all the
    same."""
    await DisclosureRepository(uow.main()).record(disclosed, at=utcnow(), request_id=request_id, caller=caller)


async def disclosures_of(
    uow: UnitOfWork,
    *,
    municipality_code: str,
    resident_id: str,
    since: datetime | None,
    until: datetime | None,
    kept_from: datetime,
) -> DisclosuresOut:
    """The transfer lookups about a resident: those ``municipality_code`` made (received) and those that read its
    records of them (provided), newest first, at most :data:`MAX_DISCLOSURES`. Of the other municipality only its
    code is shown, never its resident id (that municipality's own number). An unknown resident (or one of another
    municipality) is :func:`resident_not_found`; a moved-out one is still known here."""
    residents = ResidentRepository(await uow.for_municipality(municipality_code))
    if not await residents.known(municipality_code, [resident_id]):
        raise resident_not_found()
    rows = await DisclosureRepository(uow.main()).of_resident(
        municipality_code, resident_id, since=since, until=until, limit=MAX_DISCLOSURES + 1
    )
    out = [DisclosureOut.model_validate(_disclosure_fields(row, municipality_code)) for row in rows[:MAX_DISCLOSURES]]
    return DisclosuresOut(disclosures=out, truncated=len(rows) > MAX_DISCLOSURES, kept_from=kept_from)


async def disclosures_of_municipality(
    uow: UnitOfWork,
    *,
    municipality_code: str,
    direction: Literal["received", "provided"] | None,
    since: datetime | None,
    until: datetime | None,
    before_id: int | None,
    limit: int,
    kept_from: datetime,
) -> MunicipalityDisclosuresOut:
    """A municipality's whole disclosure log for a period, a page at a time, newest first: its lookups (received)
    and other municipalities' lookups of its records (provided), each with this municipality's resident id (the
    other's is never shown). ``before_id`` (the last id of the previous page) must be a row of this log, else it
    is an :class:`InvalidField`: another municipality's row would tell when that municipality looked someone up."""
    log = DisclosureRepository(uow.main())
    before = None
    if before_id is not None:
        before = await log.position(municipality_code, before_id)
        if before is None:
            raise InvalidField("before_id", "not a row of this municipality's disclosure log")
    rows = await log.of_municipality(
        municipality_code,
        directions=("received", "provided") if direction is None else (direction,),
        since=since,
        until=until,
        before=before,
        limit=limit + 1,
    )
    out = [
        MunicipalityDisclosureOut.model_validate(
            _disclosure_fields(row, municipality_code)
            | {
                "id": row.id,
                "resident_id": row.caller_resident_id
                if row.caller_municipality == municipality_code
                else row.source_resident_id,
            }
        )
        for row in rows[:limit]
    ]
    return MunicipalityDisclosuresOut(disclosures=out, more=len(rows) > limit, kept_from=kept_from)


def _disclosure_fields(row: TransferDisclosure, municipality_code: str) -> dict[str, Any]:
    """A log row as ``municipality_code`` sees it: which way it went, and the other municipality's code only."""
    received = row.caller_municipality == municipality_code
    return {
        "at": row.disclosed_at,
        "direction": "received" if received else "provided",
        "municipality": row.source_municipality if received else row.caller_municipality,
        "legal_basis": row.legal_basis,
        "doses": row.doses,
        "request_id": row.request_id,
    }


async def allocate_coupon_number(coupons: CouponRepository, municipality_code: str) -> str:
    """A random 10-digit number never issued in the municipality (unguessable, so a reservation site cannot
    enumerate coupons); the coupons table's key settles a race between two allocations."""
    for number in candidate_coupon_numbers(secrets.randbelow):
        if not await coupons.issued_to(municipality_code, [number]):
            return number
    raise AssertionError("unreachable")


async def reissue_coupon(
    uow: UnitOfWork,
    *,
    municipality_code: str,
    resident_id: str,
    replaces: str,
    coupon_number: str | None,
    changed_by: str,
) -> Resident:
    """A lost coupon (再発行): the resident gets a new number; the old one is invalid from today
    (``coupon.invalidated``, reason ``reissued``) and the new one is issued (``coupon.issued``)."""
    session = await uow.for_municipality(municipality_code)
    residents, coupons = ResidentRepository(session), CouponRepository(session)
    resident = await residents.get(municipality_code, resident_id, for_update=True)
    if resident is None:
        raise resident_not_found()
    if resident.coupon_number != replaces:
        held = {c.coupon_number for c in await coupons.of_resident(municipality_code, resident_id)}
        if replaces in held:
            return resident  # already replaced: a retry
        raise InvalidField("replaces", "is not a coupon number of this resident")
    if resident.moved_on is not None:
        raise Conflict("the resident moved out: the new municipality issues their coupon")
    if coupon_number is None:
        coupon_number = await allocate_coupon_number(coupons, municipality_code)
    elif await coupons.issued_to(municipality_code, [coupon_number]):
        raise Conflict("coupon_number: this coupon number was already issued")
    before, now = snapshot(resident), utcnow()
    resident.coupon_number = coupon_number
    resident.version += 1
    resident.updated_at = now
    residents.add_history([history_row(resident, before, changed_by=changed_by, at=now)])
    try:
        await residents.flush()
    except IntegrityError:
        raise Conflict("resident changed concurrently; retry the request") from None
    await announce_coupons(coupons, resident, today=japan_today())
    return resident


async def rotate_keys_batch(session: AsyncSession, vault: MyNumberVault, *, limit: int) -> int:
    """Re-seal up to ``limit`` My Numbers of one shard under the active key; how many were re-sealed (0:
    this shard is done). Resumable by construction: each batch looks for what is still under an old key."""
    residents = ResidentRepository(session)
    rows = await residents.sealed_under_other_keys(vault.active_key, limit)
    updates = []
    for municipality_code, resident_id, key_id, blob in rows:
        kid, sealed = vault.reseal(key_id, bytes(blob), context=f"{municipality_code}/{resident_id}")
        updates.append({"m": municipality_code, "r": resident_id, "old": key_id, "kid": kid, "blob": sealed})
    if updates:
        await residents.reseal(updates)
    return len(updates)
