"""records' HTTP surface: the contract paths, and an internal read registry makes on its caller's behalf."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError

from services.records import service
from services.records.models import Dose
from services.records.schemas import (
    BatchDoseIn,
    BatchItemResult,
    CorrectionIn,
    CouponStatusOut,
    DoseAccepted,
    DoseBatchIn,
    DoseBatchOut,
    DoseImportRowError,
    DoseImportStatusOut,
    DoseIn,
    DoseList,
    DoseOut,
    ImportAccepted,
    InvalidBatchItem,
    ItemError,
)
from services.records.settings import RecordsSettings
from shared.auth import Principal, Role, require, require_own_municipality
from shared.db import UnitOfWork, UnitOfWorkDep, request_unit_of_work
from shared.domain.dose_rules import DoseStatus
from shared.domain.japan_time import japan_today
from shared.domain.vaccines import default_rules
from shared.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidField,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    responses,
    validation_error_body,
)
from shared.grants import DoseVersionGrant, InvalidGrant, open_grant, verify_grant
from shared.schemas import (
    DoseSummary,
    DoseSummaryList,
    DoseVersionList,
    DoseVersionsIn,
    TransferDosesIn,
)
from shared.trusted import built

router = APIRouter(prefix="/api/v1", tags=["doses"])
internal = APIRouter(prefix="/internal/v1", tags=["internal"], include_in_schema=False)
# Authorised by the registry-signed grant in the body, not by a caller's token: registry asks it for an
# anonymous verifier, and from its background sweep, where there is no caller (see shared/grants.py).
GRANT_ONLY_PATHS = frozenset({"/internal/v1/dose-versions"})

MunicipalityCode = Annotated[str, Path(pattern=r"^\d{6}$", description="6-digit municipality code")]
# Who records doses, and how long an Idempotency-Key may be: stated once for FastAPI's dependencies and for the
# direct route of POST /doses (_plain_single_dose), which checks the same.
_RECORDERS = (Role.INSTITUTION, Role.MUNICIPALITY)
_MAX_KEY_LENGTH = 200
Recorder = Annotated[Principal, require(*_RECORDERS)]
MunicipalityPrincipal = Annotated[Principal, require(Role.MUNICIPALITY)]


async def record_dose(
    body: DoseIn,
    principal: Recorder,
    uow: UnitOfWorkDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=_MAX_KEY_LENGTH)] = None,
) -> DoseAccepted:
    """Record one dose. ``Idempotency-Key`` is required: the same key again returns the same answer, and the
    same key with another body is a 409. The same dose again under a new key is answered 200 ``duplicate``."""
    if not idempotency_key:
        raise BadRequest("the Idempotency-Key header is required, so that a retry never records a dose twice")
    accepted = await _record_one(uow, principal, idempotency_key, body)
    if accepted.status == "duplicate":
        response.status_code = status.HTTP_200_OK
    return accepted


async def _record_one(uow: UnitOfWork, principal: Principal, key: str, dose: DoseIn) -> DoseAccepted:
    [outcome] = await service.record_doses(
        uow,
        principal=principal,
        submissions=[service.Submission(key=key, dose=dose)],
        rules=default_rules(),
        today=japan_today(),
    )
    if outcome.error is not None:
        raise outcome.error
    assert outcome.accepted is not None
    return outcome.accepted


_DOSE_IN = TypeAdapter(DoseIn)
_DOSE_ACCEPTED = TypeAdapter(DoseAccepted)


async def _plain_single_dose(request: Request) -> tuple[Principal, str, DoseIn] | None:
    """The caller, key and dose of a request :func:`record_dose` would accept as they are; None otherwise."""
    principal: Principal | None = request.scope.get("state", {}).get("principal")  # set by GatewayOnly
    if principal is None or principal.role not in _RECORDERS:
        return None
    headers = request.headers
    key = headers.get("idempotency-key")
    content_type = headers.get("content-type")
    # FastAPI reads a body as JSON without a content type too; a charset changes nothing (JSON is read as UTF-8
    # by both, and a body in another encoding fails validate_json: FastAPI's handler then answers).
    media_type = None if content_type is None else content_type.partition(";")[0].strip().lower()
    if not key or len(key) > _MAX_KEY_LENGTH or media_type not in (None, "application/json"):
        return None
    try:
        dose = _DOSE_IN.validate_json(await request.body())  # the body stays cached for the fallback
    except ValidationError:
        return None
    return principal, key, dose


class _SingleDoseRoute(APIRoute):
    """``POST /doses`` without FastAPI's per-request work (dependencies solved one by one, the body decoded
    then validated, the answer validated again against its model) when the request is the plain case: the
    endpoint's own checks done once, directly (:func:`_plain_single_dose`), then the same unit of work and
    rules, and the answer encoded once, as FastAPI would encode it. Measured: FastAPI's share was about a
    quarter of records' CPU per single dose. Anything else (no caller or the wrong role, no key or a too long
    one, another media type, a body that is not a valid dose) is handed to FastAPI's handler of the same
    endpoint, so its answers (401, 403, 400, 422) are FastAPI's, and the OpenAPI document is unchanged."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        documented = super().get_route_handler()

        async def handle(request: Request) -> Response:
            plain = await _plain_single_dose(request)
            if plain is None:
                return await documented(request)
            async with request_unit_of_work(request) as uow:  # committed before the answer is sent
                accepted = await _record_one(uow, *plain)
            return Response(
                _DOSE_ACCEPTED.dump_json(accepted),
                status_code=status.HTTP_200_OK if accepted.status == "duplicate" else status.HTTP_201_CREATED,
                media_type="application/json",
            )

        return handle


router.add_api_route(
    "/doses",
    record_dose,
    methods=["POST"],
    status_code=status.HTTP_201_CREATED,
    response_model=DoseAccepted,
    responses={
        **responses(BadRequest, Unauthorized, Forbidden, Conflict, InvalidField, ServiceUnavailable),
        200: {"model": DoseAccepted, "description": "a double scan: the dose first recorded, nothing stored"},
    },
    route_class_override=_SingleDoseRoute,
)


@router.post(
    "/doses/batch",
    response_model=DoseBatchOut,
    responses=responses(Unauthorized, Forbidden, ServiceUnavailable),
)
async def record_dose_batch(body: DoseBatchIn, principal: Recorder, uow: UnitOfWorkDep) -> DoseBatchOut:
    """Record up to 1,000 doses. Each item's ``client_id`` is its idempotency key; results keep the order. An
    item whose fields do not validate is ``rejected`` with each field's error; the others are recorded."""
    valid = [(i, item) for i, item in enumerate(body.doses) if isinstance(item, BatchDoseIn)]
    outcomes = await service.record_doses(
        uow,
        principal=principal,
        submissions=[
            service.Submission(
                key=f"batch:{item.client_id}",
                dose=item,  # a BatchDoseIn is a DoseIn; its client_id is the key, not a part of the dose
                key_field=f"doses[{i}].client_id",
            )
            for i, item in valid
        ],
        rules=default_rules(),
        today=japan_today(),
    )
    by_index = {i: outcome for (i, _), outcome in zip(valid, outcomes, strict=True)}
    results = []
    for i, item in enumerate(body.doses):
        if isinstance(item, InvalidBatchItem):
            results.append(_invalid_item(i, item))
            continue
        outcome = by_index[i]
        if outcome.accepted is not None:
            accepted = outcome.accepted  # already validated: built from its fields, not re-validated
            results.append(
                built(
                    BatchItemResult,
                    client_id=item.client_id,
                    dose_id=accepted.dose_id,
                    status=accepted.status,
                    findings=accepted.findings,
                    error=None,
                )
            )
        else:
            assert outcome.error is not None
            results.append(
                BatchItemResult(client_id=item.client_id, status="rejected", error=ItemError(**outcome.error.body()))
            )
    return DoseBatchOut(results=results)


def _invalid_item(index: int, item: InvalidBatchItem) -> BatchItemResult:
    """The answer to an item whose fields do not validate: the request-wide 422's shape, fields named in the batch."""
    errors = [{"field": f"doses[{index}].{field}", "message": message} for field, message in item.errors]
    return BatchItemResult(
        client_id=item.client_id, status="rejected", error=ItemError(**validation_error_body(errors))
    )


@router.post(
    "/dose-imports",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ImportAccepted,
    responses=responses(BadRequest, Unauthorized, Forbidden, InvalidField, PayloadTooLarge),
    openapi_extra={"requestBody": {"content": {"text/csv": {"schema": {"type": "string"}}}, "required": True}},
)
async def start_dose_import(request: Request, principal: Recorder, uow: UnitOfWorkDep) -> ImportAccepted:
    """Upload a day's doses as CSV (UTF-8 or Shift_JIS; columns ``client_id, coupon, dose_number,
    vaccinated_on, vaccine, lot_number, venue, doctor, medical_worker``). The file is stored before the 202;
    rows are recorded in the background through the batch path, each row's ``client_id`` its idempotency key."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ("text/csv", "application/octet-stream"):
        raise BadRequest("the body must be a CSV file (Content-Type: text/csv)")
    settings: RecordsSettings = request.app.state.settings
    content = bytearray()
    async for chunk in request.stream():
        content += chunk
        if len(content) > settings.max_import_bytes:
            raise PayloadTooLarge(f"the file is larger than {settings.max_import_bytes} bytes; split it")
    import_id = await service.start_import(uow, principal=principal, content=bytes(content))
    worker = getattr(request.app.state, "imports", None)
    if worker is not None:
        uow.after_commit(worker.wake)
    return ImportAccepted(import_id=import_id)


@router.get(
    "/dose-imports/{import_id}",
    response_model=DoseImportStatusOut,
    responses=responses(Unauthorized, Forbidden, NotFound),
)
async def dose_import_status(
    import_id: Annotated[str, Path(max_length=36)], principal: Recorder, uow: UnitOfWorkDep
) -> DoseImportStatusOut:
    """How far an import got, with each failed row's number, field and reason (only for whoever sent it)."""
    entry = await service.import_status(uow, principal=principal, import_id=import_id)
    return DoseImportStatusOut(
        status="done" if entry.status == "done" else "running",
        phase=entry.status,
        rows_total=entry.rows_total,
        rows_ok=entry.rows_ok,
        rows_failed=entry.rows_failed,
        errors=[DoseImportRowError.model_validate(e) for e in entry.errors],
    )


@router.get(
    "/coupons/{coupon}",
    response_model=CouponStatusOut,
    responses=responses(Unauthorized, Forbidden, InvalidField),
)
async def coupon_status(
    coupon: Annotated[str, Path(max_length=18, description="the 18-digit line printed on the coupon")],
    _: Recorder,
    uow: UnitOfWorkDep,
) -> CouponStatusOut:
    """Whether records knows the coupon's holder and whether the coupon is still valid: the only thing an
    institution learns about a person before recording their dose."""
    return await service.coupon_status(uow, coupon_line=coupon, today=japan_today())


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
) -> DoseOut:
    require_own_municipality(principal, code, deny=service.dose_not_found())
    dose = await service.correct_dose(
        uow,
        principal=principal,
        municipality_code=code,
        dose_id=dose_id,
        correction=body,
        rules=default_rules(),
        today=japan_today(),
    )
    return service.to_out(dose)


@internal.get("/municipalities/{code}/doses", response_model=DoseSummaryList)
async def doses_of_coupons(
    code: MunicipalityCode,
    coupon_number: Annotated[str, Query(pattern=r"^\d{10}(,\d{10}){0,99}$", description="comma-separated")],
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
) -> DoseSummaryList:
    """The doses of a resident's coupons, for registry reading them on the municipality's behalf: the
    caller's own token is forwarded, so the same municipality scope holds here."""
    require_own_municipality(principal, code)
    doses = await service.list_doses(uow, municipality_code=code, status=None, coupon_numbers=coupon_number.split(","))
    return DoseSummaryList(doses=[_summary(d) for d in doses])


def _summary(d: Dose) -> DoseSummary:
    return DoseSummary(
        dose_id=d.dose_id,
        municipality=d.municipality_code,
        coupon_number=d.coupon_number,
        dose_number=d.dose_number,
        vaccinated_on=d.vaccinated_on,
        vaccine=d.vaccine,
        lot_number=d.lot_number,
        status=d.status,
        venue=d.venue,
        voided=d.voided,
        version=d.version,
    )


@internal.post("/transfer-doses", response_model=DoseSummaryList)
async def transfer_doses(
    body: TransferDosesIn, principal: MunicipalityPrincipal, uow: UnitOfWorkDep, request: Request
) -> DoseSummaryList:
    """Doses another municipality recorded, for a transfer lookup: only the coupons each registry-signed
    grant names, and only for the municipality the grant is made out to — whose own token is forwarded."""
    public_key: str = request.app.state.settings.transfer_grant_public_key
    try:
        grants = [verify_grant(public_key, g, caller=str(principal.municipality)) for g in body.grants]
    except InvalidGrant as exc:
        raise Forbidden(str(exc)) from None
    doses = await service.transfer_doses(uow, [(g.municipality, g.coupons) for g in grants])
    return DoseSummaryList(doses=[_summary(d) for d in doses if not d.voided])


@internal.post("/dose-versions", response_model=DoseVersionList, responses=responses(Forbidden))
async def dose_versions(body: DoseVersionsIn, uow: UnitOfWorkDep, request: Request) -> Response:
    """Version, status and voided flag of doses registry certified, for revoking the cards that show a dose
    since voided or corrected: only the dose ids the registry-signed grant names, nothing about the person."""
    public_key: str = request.app.state.settings.transfer_grant_public_key
    try:
        grant = open_grant(public_key, body.grant, DoseVersionGrant)
    except InvalidGrant as exc:
        raise Forbidden(f"grant: {exc}") from None
    named = grant.dose_ids()
    if not set(body.dose_ids) <= named.keys():
        raise Forbidden("dose_ids: the grant does not name every dose asked about")
    found = await service.dose_versions(uow, {d: named[d] for d in body.dose_ids})
    # Plain JSON in DoseVersionList's shape: a model per dose cost more than the query (sweeps ask for 1,000s).
    return JSONResponse({"doses": [{"dose_id": d, "version": v, "status": s, "voided": x} for d, v, s, x in found]})
