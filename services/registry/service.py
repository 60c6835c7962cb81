"""Registry rules: registering residents, finding coupon holders, composing a resident with doses."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError

from services.registry.crypto import MyNumberVault
from services.registry.models import Resident
from services.registry.repository import DirectoryRepository, ResidentRepository
from services.registry.schemas import (
    CouponHolder,
    CouponLookupResult,
    CouponRef,
    DoseSummary,
    ResidentIn,
    ResidentOut,
    ResidentWithDoses,
)
from shared.db import UnitOfWork, utcnow
from shared.domain.codes import mask_my_number
from shared.errors import Conflict, ServiceUnavailable, resident_not_found
from shared.internal import InternalClient

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
    residents = ResidentRepository(await uow.for_municipality(municipality_code))
    directory = DirectoryRepository(uow.main())
    resident = await residents.get(municipality_code, resident_id, for_update=True)
    created = resident is None
    now = utcnow()
    if resident is None:
        resident = Resident(municipality_code=municipality_code, resident_id=resident_id, created_at=now, version=0)
        residents.add(resident)
    old_hash = resident.my_number_hash

    if data.coupon_number is not None and data.coupon_number != resident.coupon_number:
        holder = await residents.holder_of_coupon(municipality_code, data.coupon_number)
        if holder is not None and holder.resident_id != resident_id:
            raise Conflict("coupon_number: this coupon number is held by another resident")

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
    return resident, created


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


async def resident_with_doses(resident: Resident, records: InternalClient) -> ResidentWithDoses:
    doses: list[DoseSummary] = []
    if resident.coupon_number:
        status, body = await records.request(
            "GET",
            f"/internal/v1/municipalities/{resident.municipality_code}/doses",
            params={"coupon_number": resident.coupon_number},
        )
        if status != 200:
            raise ServiceUnavailable(f"records answered {status} for the resident's doses")
        doses = [DoseSummary.model_validate(d) for d in body["doses"]]
    return ResidentWithDoses(**to_out(resident).model_dump(), doses=doses)


async def notify_records_of_holder(records: InternalClient, resident: Resident) -> None:
    """Let records match unmatched doses of this coupon (and re-cell matched ones if sex/birth changed).

    Runs after the commit. If records is unreachable the doses stay as they are until the next PUT.
    """
    if not resident.coupon_number:
        return
    holder = CouponHolder(
        resident_id=resident.resident_id,
        sex=resident.sex,
        birth_date=resident.birth_date,
    )
    try:
        status, _ = await records.request(
            "POST",
            f"/internal/v1/municipalities/{resident.municipality_code}/coupons/{resident.coupon_number}/holder",
            json=holder.model_dump(mode="json"),
        )
        if status >= 300:
            log.warning("records answered %s to a coupon-holder notice", status)
    except ServiceUnavailable as exc:
        log.warning("records unreachable for a coupon-holder notice: %s", exc.detail)


async def lookup_coupons(uow: UnitOfWork, coupons: Sequence[CouponRef]) -> list[CouponLookupResult]:
    """Holders of many coupons in one query per shard: dose batches look up all their coupons at once."""
    by_shard: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for ref in coupons:
        by_shard[await uow.databases.shard_of(ref.municipality)].append((ref.municipality, ref.coupon_number))
    found: dict[tuple[str, str], CouponHolder] = {}
    for shard, keys in by_shard.items():
        for r in await ResidentRepository(uow.shard(shard)).holders_of_coupons(keys):
            assert r.coupon_number is not None
            found[(r.municipality_code, r.coupon_number)] = CouponHolder(
                resident_id=r.resident_id,
                sex=r.sex,
                birth_date=r.birth_date,
            )
    return [
        CouponLookupResult(
            municipality=ref.municipality,
            coupon_number=ref.coupon_number,
            holder=found.get((ref.municipality, ref.coupon_number)),
        )
        for ref in coupons
    ]
