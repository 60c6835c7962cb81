"""registry's HTTP surface: the contract paths."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Path, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.registry import certificates, service
from services.registry.crypto import MyNumberVault
from services.registry.qr import read_qr_png
from services.registry.schemas import (
    CardOut,
    CertificateIn,
    ResidentIn,
    ResidentOut,
    ResidentWithDoses,
    VerifyIn,
    VerifyOut,
)
from services.registry.settings import SHC_ISSUER_PATH
from services.registry.shc import CardError
from shared.auth import Principal, PrincipalDep, Role, require, require_own_municipality
from shared.db import UnitOfWorkDep
from shared.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidField,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
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
async def verify_certificate(request: Request, uow: UnitOfWorkDep, caller: PrincipalDep) -> VerifyOut:
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
    result = await certificates.verify(uow, _records(request), _issuer(request), card=card, caller=caller)
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
