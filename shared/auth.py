"""JWT bearer tokens (python-jose) and the principal they name.

The gateway verifies every token and the services verify it again (defence in depth): a service reached
directly answers the same as through the gateway. Services call each other with short-lived ``service``
tokens minted here.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Depends, Request
from jose import JWTError, jwt

from shared.domain.codes import is_valid_institution_code, is_valid_municipality_code
from shared.errors import Forbidden, Unauthorized, VRSError
from shared.settings import AuthSettings


class Role(StrEnum):
    MUNICIPALITY = "municipality"
    INSTITUTION = "institution"
    NATIONAL = "national"
    SERVICE = "service"  # another VRS service, never a person
    ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    subject: str
    municipality: str | None = None
    institution: str | None = None

    @property
    def scope_key(self) -> str:
        """What scopes idempotency keys and audit entries: the organisation, not the device."""
        if self.role is Role.MUNICIPALITY:
            return f"municipality:{self.municipality}"
        if self.role is Role.INSTITUTION:
            return f"institution:{self.institution}"
        return f"{self.role.value}:{self.subject}"


ANONYMOUS = Principal(role=Role.ANONYMOUS, subject="anonymous")


def mint_token(
    settings: AuthSettings,
    *,
    role: Role,
    subject: str | None = None,
    municipality: str | None = None,
    institution: str | None = None,
    ttl_seconds: int | None = None,
) -> str:
    if role is Role.MUNICIPALITY and not (municipality and is_valid_municipality_code(municipality)):
        raise ValueError("a municipality token needs a valid 6-digit municipality code")
    if role is Role.INSTITUTION and not (institution and is_valid_institution_code(institution)):
        raise ValueError("an institution token needs a 10-digit medical institution code")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.jwt_issuer,
        "sub": subject or municipality or institution or role.value,
        "role": role.value,
        "iat": now,
        "exp": now + (ttl_seconds or settings.token_ttl_seconds),
        "jti": uuid.uuid4().hex,
    }
    if municipality:
        claims["municipality"] = municipality
    if institution:
        claims["institution"] = institution
    return str(jwt.encode(claims, settings.jwt_secret, algorithm=settings.jwt_algorithm))


def verify_token(settings: AuthSettings, token: str) -> Principal:
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret,
            algorithms=[settings.jwt_algorithm],
            issuer=settings.jwt_issuer,
            options={"require_exp": True, "verify_aud": False},
        )
    except JWTError as exc:
        raise Unauthorized(f"invalid token: {exc}") from None
    try:
        role = Role(str(claims.get("role")))
    except ValueError:
        raise Unauthorized("invalid token: unknown role") from None
    municipality = claims.get("municipality")
    institution = claims.get("institution")
    if role is Role.MUNICIPALITY and not (isinstance(municipality, str) and is_valid_municipality_code(municipality)):
        raise Unauthorized("invalid token: municipality claim missing or invalid")
    if role is Role.INSTITUTION and not (isinstance(institution, str) and is_valid_institution_code(institution)):
        raise Unauthorized("invalid token: institution claim missing or invalid")
    if role is Role.ANONYMOUS:
        raise Unauthorized("invalid token: anonymous is not a token role")
    return Principal(
        role=role,
        subject=str(claims.get("sub", "")),
        municipality=municipality if role is Role.MUNICIPALITY else None,
        institution=institution if role is Role.INSTITUTION else None,
    )


def principal_from_header(settings: AuthSettings, authorization: str | None) -> Principal:
    if not authorization:
        return ANONYMOUS
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization header must be 'Bearer <token>'")
    return verify_token(settings, token.strip())


class TokenVerifier:
    """Verifies bearer tokens, remembering the ones already verified.

    An HS256 verification costs about 35 µs, a cache hit well under 1 µs; devices send the same token for its
    whole life, so at thousands of requests per second the cache saves a good part of a core (far more once
    tokens are asymmetric). Only successes are cached, each until the earlier of its ``exp`` and
    ``ttl_seconds`` from now, so a rotated signing key takes effect within ``ttl_seconds``.
    """

    def __init__(self, settings: AuthSettings, *, cache_size: int, ttl_seconds: float) -> None:
        self._settings = settings
        self._cache_size = cache_size
        self._ttl = ttl_seconds
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def principal(self, authorization: str | None) -> Principal:
        """The caller named by an ``Authorization`` header; raises ``Unauthorized`` if it names nobody valid."""
        if not authorization:
            return ANONYMOUS
        if not self._cache_size:
            return principal_from_header(self._settings, authorization)
        now = time.time()
        hit = self._cache.get(authorization)
        if hit is not None:
            if hit[1] > now:
                self._cache.move_to_end(authorization)
                return hit[0]
            del self._cache[authorization]
        principal = principal_from_header(self._settings, authorization)
        # Verified just above, so reading the claims again without verification is safe.
        exp = jwt.get_unverified_claims(authorization.partition(" ")[2].strip())["exp"]
        self._cache[authorization] = (principal, min(float(exp), now + self._ttl))
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal

    def __len__(self) -> int:
        return len(self._cache)


async def _principal(request: Request) -> Principal:
    # async: a plain `def` dependency would cost a thread-pool hop on every request.
    verifier: TokenVerifier = request.app.state.token_verifier
    return verifier.principal(request.headers.get("authorization"))


PrincipalDep = Annotated[Principal, Depends(_principal)]


def require(*roles: Role) -> Any:
    """Dependency: the caller must hold one of ``roles``; returns the principal."""

    async def check(principal: PrincipalDep) -> Principal:
        if principal.role not in roles:
            if principal.role is Role.ANONYMOUS:
                raise Unauthorized("a bearer token is required")
            raise Forbidden(f"role '{principal.role.value}' may not do this")
        return principal

    return Depends(check)


def require_own_municipality(principal: Principal, code: str, *, deny: VRSError | None = None) -> None:
    """A municipality acts on its own code only (services act for any).

    ``deny`` is what a stranger gets; for personal data it must be the very answer an unknown id gets, so
    that nobody learns whether another municipality has a given resident.
    """
    if principal.role is Role.SERVICE:
        return
    if principal.role is Role.MUNICIPALITY and principal.municipality == code:
        return
    raise deny or Forbidden("this municipality is not yours")
