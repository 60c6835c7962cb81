"""Registry rules: registering residents, announcing their coupons, composing a resident with doses.

Every change that matters to records — a coupon issued, its holder's sex or birth date changed, a coupon no
longer valid — is written as a coupon event to registry's outbox in the same transaction as the change.
Registry never calls records to tell it anything; it only reads from records on a caller's behalf.
"""

from __future__ import annotations

import logging
from datetime import date
from typing import Any

from sqlalchemy.exc import IntegrityError

from services.registry.crypto import MyNumberVault
from services.registry.models import Coupon, Resident
from services.registry.repository import CouponRepository, DirectoryRepository, ResidentRepository
from services.registry.schemas import ResidentIn, ResidentOut, ResidentWithDoses
from shared.db import UnitOfWork, utcnow
from shared.domain.codes import mask_my_number
from shared.domain.japan_time import japan_today
from shared.domain.sex import Sex
from shared.errors import Conflict, ServiceUnavailable, resident_not_found
from shared.events import CouponEvent, CouponEventType, CouponInvalidReason, CouponState
from shared.internal import InternalClient
from shared.schemas import DoseSummary

log = logging.getLogger(__name__)


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
        moved_to=resident.moved_to,
        moved_on=resident.moved_on,
        created_at=resident.created_at,
        updated_at=resident.updated_at,
    )


async def put_resident(
    uow: UnitOfWork, vault: MyNumberVault, *, municipality_code: str, resident_id: str, data: ResidentIn
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
    old_hash = resident.my_number_hash

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
    try:
        await residents.flush()
    except IntegrityError:
        # Two concurrent PUTs: the loser's retry will see the winner's row.
        raise Conflict("resident changed concurrently; retry the request") from None

    if old_hash is not None and old_hash != resident.my_number_hash:
        await directory.remove(old_hash, municipality_code)
    if resident.my_number_hash is not None:
        await directory.put(resident.my_number_hash, municipality_code, resident_id)
    await announce_coupons(coupons, resident, today=japan_today())
    return resident, created


def _desired_state(coupon: Coupon, resident: Resident, *, today: date) -> CouponState:
    """What records should know of ``coupon`` now: its holder's cell attributes and its validity."""
    if coupon.coupon_number == resident.coupon_number:
        invalid_from, reason = None, None
    elif coupon.invalid_from is not None:
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


def _event_type(coupon: Coupon, state: CouponState) -> CouponEventType:
    if coupon.version == 0 or (coupon.invalid_from is not None and state.invalid_from is None):
        return CouponEventType.ISSUED
    if coupon.invalid_from is None and state.invalid_from is not None:
        return CouponEventType.INVALIDATED
    return CouponEventType.HOLDER_CHANGED


async def announce_coupons(coupons: CouponRepository, resident: Resident, *, today: date) -> list[CouponEvent]:
    """Bring every coupon of ``resident`` to the state its record implies, with an event for each change.

    Idempotent: a coupon whose announced state already matches gets no event, so repeating a PUT (or an
    import row) publishes nothing. Old coupons follow the holder's sex and birth date too: doses recorded on
    them belong to the same person and must move to the same statistics cell.
    """
    municipality, now = resident.municipality_code, utcnow()
    rows = {c.coupon_number: c for c in await coupons.of_resident(municipality, resident.resident_id, for_update=True)}
    if resident.coupon_number is not None and resident.coupon_number not in rows:
        fresh = Coupon(
            municipality_code=municipality,
            coupon_number=resident.coupon_number,
            resident_id=resident.resident_id,
            version=0,
            created_at=now,
        )
        coupons.add(fresh)
        rows[resident.coupon_number] = fresh
    events = []
    for number, coupon in sorted(rows.items()):
        state = _desired_state(coupon, resident, today=today)
        announced = (coupon.sex, coupon.birth_date, coupon.invalid_from, coupon.invalid_reason)
        if coupon.version and announced == (state.sex, state.birth_date, state.invalid_from, state.invalid_reason):
            continue
        kind = _event_type(coupon, state)
        coupon.sex, coupon.birth_date = state.sex.value, state.birth_date
        coupon.invalid_from = state.invalid_from
        coupon.invalid_reason = state.invalid_reason.value if state.invalid_reason else None
        coupon.version += 1
        coupon.updated_at = now
        events.append(
            CouponEvent(type=kind, municipality=municipality, coupon_number=number, version=coupon.version, state=state)
        )
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
