"""records' HTTP surface: the contract paths, and internal paths for registry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, status

from services.records import service
from services.records.registry_client import CouponHolders
from services.records.relay import OutboxRelay
from services.records.schemas import (
    BatchItemResult,
    CorrectionIn,
    DoseAccepted,
    DoseBatchIn,
    DoseBatchOut,
    DoseIn,
    DoseList,
    DoseOut,
    DoseSummary,
    DoseSummaryList,
    HolderIn,
    ItemError,
)
from shared.auth import Principal, Role, require, require_own_municipality
from shared.db import UnitOfWork, UnitOfWorkDep
from shared.domain.dose_rules import DoseStatus
from shared.domain.vaccines import default_rules
from shared.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidField,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    responses,
)

router = APIRouter(prefix="/api/v1", tags=["doses"])
internal = APIRouter(prefix="/internal/v1", tags=["internal"], include_in_schema=False)

MunicipalityCode = Annotated[str, Path(pattern=r"^\d{6}$", description="6-digit municipality code")]
Recorder = Annotated[Principal, require(Role.INSTITUTION, Role.MUNICIPALITY)]
MunicipalityPrincipal = Annotated[Principal, require(Role.MUNICIPALITY)]


def _holders(request: Request) -> CouponHolders:
    holders: CouponHolders = request.app.state.holders
    return holders


def _wake_relay_after_commit(request: Request, uow: UnitOfWork) -> None:
    relay: OutboxRelay | None = request.app.state.relay
    if relay is not None:
        uow.after_commit(lambda: relay.wake(*uow.touched_shards))


@router.post(
    "/doses",
    status_code=status.HTTP_201_CREATED,
    response_model=DoseAccepted,
    responses=responses(BadRequest, Unauthorized, Forbidden, InvalidField, ServiceUnavailable),
)
async def record_dose(
    body: DoseIn,
    principal: Recorder,
    uow: UnitOfWorkDep,
    request: Request,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> DoseAccepted:
    """Record one dose. ``Idempotency-Key`` is required: the same key again returns the same answer."""
    if not idempotency_key:
        raise BadRequest("the Idempotency-Key header is required, so that a retry never records a dose twice")
    [outcome] = await service.record_doses(
        uow,
        _holders(request),
        principal=principal,
        submissions=[service.Submission(key=idempotency_key, dose=body)],
        rules=default_rules(),
        today=service.japan_today(),
    )
    if outcome.error is not None:
        raise outcome.error
    assert outcome.accepted is not None
    _wake_relay_after_commit(request, uow)
    return outcome.accepted


@router.post(
    "/doses/batch",
    response_model=DoseBatchOut,
    responses=responses(Unauthorized, Forbidden, ServiceUnavailable),
)
async def record_dose_batch(
    body: DoseBatchIn, principal: Recorder, uow: UnitOfWorkDep, request: Request
) -> DoseBatchOut:
    """Record up to 1,000 doses. Each item's ``client_id`` is its idempotency key; results keep the order."""
    outcomes = await service.record_doses(
        uow,
        _holders(request),
        principal=principal,
        submissions=[
            service.Submission(
                key=f"batch:{item.client_id}", dose=DoseIn.model_validate(item.model_dump(exclude={"client_id"}))
            )
            for item in body.doses
        ],
        rules=default_rules(),
        today=service.japan_today(),
    )
    _wake_relay_after_commit(request, uow)
    results = []
    for item, outcome in zip(body.doses, outcomes, strict=True):
        if outcome.accepted is not None:
            results.append(BatchItemResult(client_id=item.client_id, **outcome.accepted.model_dump()))
        else:
            assert outcome.error is not None
            results.append(
                BatchItemResult(client_id=item.client_id, status="rejected", error=ItemError(**outcome.error.body()))
            )
    return DoseBatchOut(results=results)


@router.get(
    "/municipalities/{code}/doses",
    response_model=DoseList,
    responses=responses(Unauthorized, Forbidden),
)
async def list_doses(
    code: MunicipalityCode,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    status_: Annotated[DoseStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> DoseList:
    """Doses of coupons this municipality issued; ``status=needs_review`` is the review queue."""
    require_own_municipality(principal, code)
    doses = await service.list_doses(uow, municipality_code=code, status=status_, limit=limit)
    return DoseList(doses=[service.to_out(d) for d in doses])


@router.post(
    "/municipalities/{code}/doses/{dose_id}/corrections",
    response_model=DoseOut,
    responses=responses(Unauthorized, Forbidden, NotFound, Conflict, InvalidField),
)
async def correct_dose(
    code: MunicipalityCode,
    dose_id: Annotated[str, Path(max_length=36)],
    body: CorrectionIn,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    request: Request,
) -> DoseOut:
    require_own_municipality(principal, code, deny=service.dose_not_found())
    dose = await service.correct_dose(
        uow,
        _holders(request),
        principal=principal,
        municipality_code=code,
        dose_id=dose_id,
        correction=body,
        rules=default_rules(),
        today=service.japan_today(),
    )
    _wake_relay_after_commit(request, uow)
    return service.to_out(dose)


@internal.get("/municipalities/{code}/doses", response_model=DoseSummaryList)
async def doses_of_coupon(
    code: MunicipalityCode,
    coupon_number: Annotated[str, Query(pattern=r"^\d{10}$")],
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
) -> DoseSummaryList:
    # registry forwards the municipality's own token: the scope is checked here again, not assumed.
    require_own_municipality(principal, code)
    doses = await service.list_doses(uow, municipality_code=code, status=None, coupon_number=coupon_number)
    return DoseSummaryList(
        doses=[
            DoseSummary(
                dose_id=d.dose_id,
                dose_number=d.dose_number,
                vaccinated_on=d.vaccinated_on,
                vaccine=d.vaccine,
                lot_number=d.lot_number,
                status=d.status,
                municipality=d.municipality_code,
            )
            for d in doses
        ]
    )


@internal.post("/municipalities/{code}/coupons/{coupon_number}/holder")
async def coupon_holder(
    code: MunicipalityCode,
    coupon_number: Annotated[str, Path(pattern=r"^\d{10}$")],
    body: HolderIn,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    request: Request,
) -> dict[str, int]:
    require_own_municipality(principal, code)
    _holders(request).forget((code, coupon_number))
    changed = await service.apply_holder(
        uow, municipality_code=code, coupon_number=coupon_number, holder=body, by=principal.scope_key
    )
    _wake_relay_after_commit(request, uow)
    return {"changed": changed}
