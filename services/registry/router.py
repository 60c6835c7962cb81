"""registry's HTTP surface: the contract paths."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response, status

from services.registry import importer, service
from services.registry.crypto import MyNumberVault
from services.registry.schemas import (
    CouponReissueIn,
    ImportAccepted,
    ImportStatus,
    MoveOutIn,
    ResidentIn,
    ResidentOut,
    ResidentWithDoses,
    TransferLookupBatchIn,
    TransferLookupBatchOut,
    TransferLookupIn,
    TransferLookupOut,
    TransferLookupResult,
)
from shared.auth import Principal, Role, require, require_own_municipality
from shared.db import UnitOfWorkDep
from shared.errors import (
    Conflict,
    Forbidden,
    InvalidField,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    resident_not_found,
    responses,
)
from shared.internal import InternalClient

router = APIRouter(prefix="/api/v1/municipalities/{code}", tags=["residents"])

MunicipalityCode = Annotated[str, Path(pattern=r"^\d{6}$", description="6-digit municipality code")]
ResidentId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
MunicipalityPrincipal = Annotated[Principal, require(Role.MUNICIPALITY)]


def _vault(request: Request) -> MyNumberVault:
    vault: MyNumberVault = request.app.state.vault
    return vault


def _records(request: Request) -> InternalClient:
    client: InternalClient = request.app.state.records
    return client


@router.put(
    "/residents/{resident_id}",
    response_model=ResidentOut,
    responses={**responses(Unauthorized, Forbidden, Conflict, InvalidField), 201: {"model": ResidentOut}},
)
async def put_resident(
    code: MunicipalityCode,
    resident_id: ResidentId,
    body: ResidentIn,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    request: Request,
    response: Response,
) -> ResidentOut:
    require_own_municipality(principal, code)
    resident, created = await service.put_resident(
        uow,
        _vault(request),
        municipality_code=code,
        resident_id=resident_id,
        data=body,
        changed_by=principal.scope_key,
    )
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return service.to_out(resident)


@router.get(
    "/residents/{resident_id}",
    response_model=ResidentWithDoses,
    responses=responses(Unauthorized, Forbidden, NotFound, ServiceUnavailable),
)
async def get_resident(
    code: MunicipalityCode,
    resident_id: ResidentId,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    request: Request,
) -> ResidentWithDoses:
    require_own_municipality(principal, code, deny=resident_not_found())
    resident = await service.get_resident(uow, municipality_code=code, resident_id=resident_id)
    return await service.resident_with_doses(uow, resident, _records(request))


@router.post(
    "/resident-imports",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ImportAccepted,
    responses=responses(Unauthorized, Forbidden),
    openapi_extra={"requestBody": {"content": {"text/csv": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def post_resident_import(
    code: MunicipalityCode, principal: MunicipalityPrincipal, uow: UnitOfWorkDep, request: Request
) -> ImportAccepted:
    """Store the CSV (UTF-8, UTF-8 with BOM, or Shift_JIS) and import it in the background; the same file
    again answers with the same ``import_id`` and changes nothing."""
    require_own_municipality(principal, code)
    file, sha256, size = await importer.spool(request.stream())
    with file:
        import_id, new = await importer.submit(
            uow, municipality_code=code, submitted_by=principal.scope_key, file=file, sha256=sha256, size=size
        )
    runner: importer.ResidentImporter = request.app.state.importer
    if new:
        uow.after_commit(lambda: runner.start(import_id))
    return ImportAccepted(import_id=import_id)


@router.get(
    "/resident-imports/{import_id}",
    response_model=ImportStatus,
    responses=responses(Unauthorized, Forbidden, NotFound),
)
async def get_resident_import(
    code: MunicipalityCode,
    import_id: Annotated[str, Path(max_length=36)],
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    errors_after_row: Annotated[int, Query(ge=0, description="page through errors: the last row seen")] = 0,
    errors_limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> ImportStatus:
    require_own_municipality(principal, code)
    return await importer.status(
        uow, municipality_code=code, import_id=import_id, errors_after_row=errors_after_row, errors_limit=errors_limit
    )


@router.post(
    "/residents/{resident_id}/move-out",
    response_model=ResidentOut,
    responses=responses(Unauthorized, NotFound, InvalidField),
)
async def move_out(
    code: MunicipalityCode,
    resident_id: ResidentId,
    body: MoveOutIn,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
) -> ResidentOut:
    """転出: the record stays; its coupons are valid up to and including the moving day."""
    require_own_municipality(principal, code, deny=resident_not_found())
    resident = await service.move_out(
        uow,
        municipality_code=code,
        resident_id=resident_id,
        moved_to=body.moved_to,
        moved_on=body.moved_on,
        changed_by=principal.scope_key,
    )
    return service.to_out(resident)


def _grant_key(request: Request) -> str:
    key: str = request.app.state.settings.transfer_grant_private_key
    return key


@router.post(
    "/transfer-lookups",
    response_model=TransferLookupOut,
    responses=responses(Unauthorized, InvalidField, ServiceUnavailable),
)
async def transfer_lookup(
    code: MunicipalityCode,
    body: TransferLookupIn,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    request: Request,
) -> TransferLookupOut:
    """Earlier doses, under other municipalities, of a person now registered here; anyone else: no doses."""
    require_own_municipality(principal, code, deny=resident_not_found())
    (doses,) = await service.transfer_lookups(
        uow,
        _vault(request),
        _records(request),
        caller=code,
        lookups=[(body.my_number, body.legal_basis)],
        grant_key=_grant_key(request),
    )
    return TransferLookupOut(doses=doses)


@router.post(
    "/transfer-lookups/batch",
    response_model=TransferLookupBatchOut,
    responses=responses(Unauthorized, InvalidField, ServiceUnavailable),
)
async def transfer_lookup_batch(
    code: MunicipalityCode,
    body: TransferLookupBatchIn,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    request: Request,
    access_purpose: Annotated[str | None, Header(alias="X-Access-Purpose")] = None,
) -> TransferLookupBatchOut:
    """Up to 1,000 lookups in one answer, in the order asked. The gateway audits the batch with the legal
    bases the ``X-Access-Purpose`` header names (comma-separated), so it must name every one used."""
    require_own_municipality(principal, code, deny=resident_not_found())
    stated = {part.strip() for part in (access_purpose or "").split(",") if part.strip()}
    used = {item.legal_basis for item in body.lookups}
    if not used <= stated:
        raise InvalidField(
            "X-Access-Purpose", f"must name every legal basis of the batch ({', '.join(sorted(used))}) for the audit"
        )
    answers = await service.transfer_lookups(
        uow,
        _vault(request),
        _records(request),
        caller=code,
        lookups=[(item.my_number, item.legal_basis) for item in body.lookups],
        grant_key=_grant_key(request),
    )
    return TransferLookupBatchOut(
        results=[
            TransferLookupResult(client_id=item.client_id, doses=doses)
            for item, doses in zip(body.lookups, answers, strict=True)
        ]
    )


@router.post(
    "/residents/{resident_id}/coupon-reissue",
    response_model=ResidentOut,
    responses=responses(Unauthorized, NotFound, Conflict, InvalidField),
)
async def coupon_reissue(
    code: MunicipalityCode,
    resident_id: ResidentId,
    body: CouponReissueIn,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
) -> ResidentOut:
    """再発行: a new coupon number for a lost coupon; the old one is invalid from today."""
    require_own_municipality(principal, code, deny=resident_not_found())
    resident = await service.reissue_coupon(
        uow,
        municipality_code=code,
        resident_id=resident_id,
        replaces=body.replaces,
        coupon_number=body.coupon_number,
        changed_by=principal.scope_key,
    )
    return service.to_out(resident)
