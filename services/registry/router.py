"""registry's HTTP surface: the contract paths."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status

from services.registry import service
from services.registry.crypto import MyNumberVault
from services.registry.schemas import ResidentIn, ResidentOut, ResidentWithDoses
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
        uow, _vault(request), municipality_code=code, resident_id=resident_id, data=body
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
