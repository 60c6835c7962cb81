"""One error model for every service: ``{"error": "<Code>", "detail": "...", ...}``.

Services raise subclasses of :class:`VRSError`; :func:`install_error_handlers` maps them (and FastAPI's own
validation errors) to JSON once. ``responses(...)`` lets an endpoint declare what it may return so that the
errors appear in OpenAPI.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.domain.period import period_bound
from shared.shardmove import fenced_municipality

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    error: str
    detail: str


class FieldError(BaseModel):
    field: str
    message: str


class ValidationErrorBody(ErrorBody):
    errors: list[FieldError]


class VRSError(Exception):
    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "InternalError"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}


class BadRequest(VRSError):
    status_code = 400
    code = "BadRequest"


class InvalidField(VRSError):
    """A well-formed request whose field breaks a domain rule (bad check digit, future date, ...)."""

    status_code = 422
    code = "InvalidField"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", errors=[{"field": field, "message": message}])
        self.field = field
        self.message = message


class Unauthorized(VRSError):
    status_code = 401
    code = "Unauthorized"


class Forbidden(VRSError):
    status_code = 403
    code = "Forbidden"


class NotFound(VRSError):
    status_code = 404
    code = "NotFound"


class Conflict(VRSError):
    status_code = 409
    code = "Conflict"


class PayloadTooLarge(VRSError):
    status_code = 413
    code = "PayloadTooLarge"


class TooManyRequests(VRSError):
    status_code = 429
    code = "TooManyRequests"


class BadGateway(VRSError):
    status_code = 502
    code = "BadGateway"


class ServiceUnavailable(VRSError):
    status_code = 503
    code = "ServiceUnavailable"


class GatewayTimeout(VRSError):
    status_code = 504
    code = "GatewayTimeout"


RESIDENT_NOT_FOUND = "resident not found"


def resident_not_found() -> NotFound:
    """The one answer for a resident that does not exist *or* is not the caller's to see (registry and
    gateway both give it, byte for byte, so nobody learns whether another municipality has the person)."""
    return NotFound(RESIDENT_NOT_FOUND)


def error_response(error: VRSError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(error, Unauthorized) else {}
    if isinstance(error, (TooManyRequests, ServiceUnavailable)) and "retry_after" in error.extra:
        headers["Retry-After"] = str(error.extra.get("retry_after", 1))
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers or None)


def responses(*errors: type[VRSError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the errors an endpoint can return."""
    out: dict[int | str, dict[str, Any]] = {}
    for err in errors:
        model = ValidationErrorBody if err is InvalidField else ErrorBody
        out[err.status_code] = {"model": model, "description": err.code}
    return out


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def period_parameters(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """The ``from``/``to`` query parameters of a read by period, as :func:`period_bound` reads them (absent or
    empty: no bound); a bad one is :class:`InvalidField` naming the parameter."""
    bounds: list[datetime | None] = []
    for name, value, end in (("from", since, False), ("to", until, True)):
        try:
            bounds.append(period_bound(value, end=end) if value else None)
        except ValueError as exc:
            raise InvalidField(name, str(exc)) from None
    return bounds[0], bounds[1]


def validation_error_body(errors: list[dict[str, str]]) -> dict[str, Any]:
    """The body of a 422 for input that does not validate: each field and why. Never the input itself: it may hold
    a My Number."""
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return {"error": "ValidationError", "detail": detail, "errors": errors}


def install_error_handlers(app: FastAPI) -> None:
    async def vrs_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, VRSError)
        return error_response(exc)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{"field": _field_name(tuple(e["loc"])), "message": e["msg"]} for e in exc.errors()]
        return JSONResponse(validation_error_body(errors), status_code=422)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback by the server; the caller learns only that it was not their fault.
        if isinstance(exc, (OSError, OperationalError, InterfaceError)):
            return JSONResponse(
                {"error": "ServiceUnavailable", "detail": "a backing service is unavailable; retry"}, status_code=503
            )
        return JSONResponse({"error": "InternalError", "detail": "internal error"}, status_code=500)

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        moving = fenced_municipality(exc)
        if moving is None:
            log.error("unhandled database error", exc_info=exc)
            return await unexpected(request, exc)
        # The municipality's shard refused the write: it is being moved (shared/shardmove.py). Forget the cached
        # shard so that the retry, after the move, goes to the new one.
        databases = getattr(request.app.state, "databases", None)
        if databases is not None and moving:
            databases.forget(moving)
        return error_response(
            ServiceUnavailable(
                "this municipality's records are being moved between database shards; retry in a second",
                retry_after=1,
            )
        )

    app.add_exception_handler(VRSError, vrs_error)
    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(DBAPIError, database_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
