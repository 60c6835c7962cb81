"""registry's HTTP surface: the contract paths."""

from __future__ import annotations

import asyncio
import base64
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.registry import certificates, importer, service
from services.registry.crypto import MyNumberVault
from services.registry.qr import read_qr_png
from services.registry.schemas import (
    CardOut,
    CertificateIn,
    CouponReissueIn,
    DisclosuresOut,
    ImportAccepted,
    ImportStatus,
    MoveOutIn,
    MunicipalityDisclosuresOut,
    ResidentIn,
    ResidentOut,
    ResidentWithDoses,
    TransferLookupBatchIn,
    TransferLookupBatchOut,
    TransferLookupIn,
    TransferLookupOut,
    TransferLookupResult,
    VerifyIn,
    VerifyOut,
)
from services.registry.settings import SHC_ISSUER_PATH
from services.registry.shc import CardError
from shared.auth import Principal, Role, require, require_own_municipality
from shared.db import UnitOfWorkDep, utcnow
from shared.domain.period import kept_since
from shared.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidField,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    period_parameters,
    resident_not_found,
    responses,
)
from shared.internal import InternalClient

router = APIRouter(prefix="/api/v1/municipalities/{code}", tags=["residents"])
# Open to anyone: the verifier and the issuer's public documents (SMART Health Cards spec).
public = APIRouter(tags=["certificates"])
JAPAN = ZoneInfo("Asia/Tokyo")
MAX_VERIFY_BODY = 5 * 1024 * 1024

MunicipalityCode = Annotated[str, Path(pattern=r"^\d{6}$", description="6-digit municipality code")]
ResidentId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
MunicipalityPrincipal = Annotated[Principal, require(Role.MUNICIPALITY)]


def _vault(request: Request) -> MyNumberVault:
    vault: MyNumberVault = request.app.state.vault
    return vault


def _records(request: Request) -> InternalClient:
    client: InternalClient = request.app.state.records
    return client


def _issuer(request: Request) -> certificates.Issuer:
    issuer: certificates.Issuer = request.app.state.issuer
    return issuer


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
    found = await service.resident_with_doses(uow, resident, _records(request))
    # The doses were read anyway: a certificate they no longer match is revoked now, not at its next check.
    await certificates.refresh_revocations(uow, resident, found.doses)
    return found


@router.post(
    "/residents/{resident_id}/certificates",
    response_model=CardOut,
    responses={
        **responses(Unauthorized, Forbidden, NotFound, Conflict, InvalidField, ServiceUnavailable),
        200: {
            "description": "format shc: the card as JSON; format pdf: the 接種証明書",
            "content": {"application/pdf": {}},
        },
    },
)
async def issue_certificate(
    code: MunicipalityCode,
    resident_id: ResidentId,
    body: CertificateIn,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    request: Request,
) -> Any:
    """Issue the resident's 接種証明書 as a PDF, or as a SMART Health Card with its QR code.

    The certificate shows the recorded, non-voided doses. Asked again with the same doses, it is the same
    certificate; once a dose is corrected or voided, the next one is new and the previous one is revoked.
    """
    require_own_municipality(principal, code, deny=resident_not_found())
    issuer = _issuer(request)
    card = await certificates.issue_card(
        uow,
        _records(request),
        issuer,
        municipality_code=code,
        resident_id=resident_id,
    )
    if body.format == "shc":
        png = await certificates.card_qr_png(card)
        return CardOut(certificate_id=card.certificate_id, shc=card.shc, qr_png=base64.b64encode(png).decode())
    pdf = await certificates.certificate_pdf(card, issuer, issued_on=card.issued_at.astimezone(JAPAN).date())
    return Response(
        pdf,
        media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="certificate-{card.certificate_id}.pdf"'},
    )


@router.get(
    "/residents/{resident_id}/fhir",
    responses={
        **responses(Unauthorized, Forbidden, NotFound, ServiceUnavailable),
        200: {"description": "a FHIR R4 Bundle", "content": {"application/fhir+json": {}}},
    },
)
async def export_fhir(
    code: MunicipalityCode,
    resident_id: ResidentId,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    request: Request,
) -> Response:
    """The resident's immunization history as a FHIR R4 Bundle; voided doses are ``entered-in-error``."""
    require_own_municipality(principal, code, deny=resident_not_found())
    bundle = await certificates.fhir_export(uow, _records(request), municipality_code=code, resident_id=resident_id)
    return JSONResponse(bundle, media_type="application/fhir+json")


@public.post(
    "/api/v1/certificates/verify",
    response_model=VerifyOut,
    responses=responses(BadRequest, InvalidField, PayloadTooLarge, ServiceUnavailable),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": VerifyIn.model_json_schema()},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
async def verify_certificate(request: Request, uow: UnitOfWorkDep) -> VerifyOut:
    """Check a SMART Health Card given as its ``shc:/`` string or as a picture (PNG) of its QR code."""
    body = await request.body()
    if len(body) > MAX_VERIFY_BODY:
        raise PayloadTooLarge(f"at most {MAX_VERIFY_BODY} bytes")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "image/png":
        try:
            card = await asyncio.to_thread(read_qr_png, body)
        except CardError as exc:
            return VerifyOut(valid=False, reasons=[f"format: {exc}"], claims={})
    elif media_type in ("application/json", ""):
        try:
            card = VerifyIn.model_validate_json(body or b"{}").shc
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    else:
        raise BadRequest('send application/json {"shc": "shc:/..."} or an image/png of the QR code')
    result = await certificates.verify(uow, _records(request), _issuer(request), card=card)
    return VerifyOut(valid=result.valid, reasons=result.reasons, claims=result.claims)


# Verifier apps fetch these from browsers on other origins; the spec asks issuers to allow it.
_CORS = {"Access-Control-Allow-Origin": "*"}


@public.get(f"{SHC_ISSUER_PATH}/.well-known/jwks.json")
async def issuer_keys(uow: UnitOfWorkDep, request: Request) -> Response:
    """The public keys that verify this issuer's health cards (not the keys of the API's tokens)."""
    return JSONResponse(await certificates.jwks(uow, _issuer(request)), headers=_CORS)


@public.get(f"{SHC_ISSUER_PATH}/.well-known/crl/{{kid}}.json", responses=responses(NotFound))
async def revocation_list(kid: Annotated[str, Path(max_length=64)], uow: UnitOfWorkDep, request: Request) -> Response:
    """The revocation list of one signing key: the ``rid`` of every card revoked."""
    return JSONResponse(await certificates.revocation_list(uow, _issuer(request), kid=kid), headers=_CORS)


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
            uow,
            vault=_vault(request),
            municipality_code=code,
            submitted_by=principal.scope_key,
            file=file,
            sha256=sha256,
            size=size,
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


def _request_id(request: Request) -> str:
    # Always there: shared.observability's middleware keeps the gateway's X-Request-ID or sets a new one.
    return request.headers["x-request-id"]


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
        request_id=_request_id(request),
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
    """Up to 1,000 lookups in one answer, in the order asked. The gateway reads every item's legal basis, audits
    the batch with them and names them in ``X-Access-Purpose`` (comma-separated); checked again here: it must
    name every one used."""
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
        request_id=_request_id(request),
    )
    return TransferLookupBatchOut(
        results=[
            TransferLookupResult(client_id=item.client_id, doses=doses)
            for item, doses in zip(body.lookups, answers, strict=True)
        ]
    )


_BOUND = (
    "YYYY-MM-DD (a whole Japanese day, as the gateway's audit read) or an ISO 8601 date-time (without a zone: Japan's)"
)


def _disclosures_kept_from(request: Request) -> datetime:
    """Where the disclosure log's retention stands today: rows from this moment on are kept."""
    return kept_since(utcnow(), request.app.state.settings.disclosure_keep_years)


@router.get(
    "/residents/{resident_id}/disclosures",
    response_model=DisclosuresOut,
    responses=responses(Unauthorized, Forbidden, NotFound, InvalidField),
)
async def get_disclosures(
    request: Request,
    code: MunicipalityCode,
    resident_id: ResidentId,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    since: Annotated[str | None, Query(alias="from", max_length=64, description=_BOUND)] = None,
    until: Annotated[str | None, Query(alias="to", max_length=64, description=_BOUND)] = None,
) -> DisclosuresOut:
    """情報提供等記録: the transfer lookups that read this resident's doses, newest first (at most 1,000) —
    received (this municipality read another's records) and provided (another municipality read this one's)."""
    require_own_municipality(principal, code, deny=resident_not_found())
    start, end = period_parameters(since, until)
    return await service.disclosures_of(
        uow,
        municipality_code=code,
        resident_id=resident_id,
        since=start,
        until=end,
        kept_from=_disclosures_kept_from(request),
    )


@router.get(
    "/disclosures",
    response_model=MunicipalityDisclosuresOut,
    responses=responses(Unauthorized, Forbidden, InvalidField),
)
async def get_municipality_disclosures(
    request: Request,
    code: MunicipalityCode,
    principal: MunicipalityPrincipal,
    uow: UnitOfWorkDep,
    since: Annotated[str | None, Query(alias="from", max_length=64, description=_BOUND)] = None,
    until: Annotated[str | None, Query(alias="to", max_length=64, description=_BOUND)] = None,
    direction: Annotated[
        Literal["received", "provided"] | None, Query(description="only this municipality's lookups, or only others'")
    ] = None,
    before_id: Annotated[int | None, Query(ge=1, description="the last id of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_DISCLOSURES)] = service.MAX_DISCLOSURES,
) -> MunicipalityDisclosuresOut:
    """情報提供等記録 of the whole municipality for a period, newest first, a page at a time: the transfer lookups
    it made (received) and other municipalities' lookups of its records (provided), each with its own resident's
    id — what an audit of the municipality's My Number use reads."""
    require_own_municipality(principal, code)
    start, end = period_parameters(since, until)
    return await service.disclosures_of_municipality(
        uow,
        municipality_code=code,
        direction=direction,
        since=start,
        until=end,
        before_id=before_id,
        limit=limit,
        kept_from=_disclosures_kept_from(request),
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
