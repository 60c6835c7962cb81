"""Development identity tokens: what an identity provider would issue, signed with the DEVELOPMENT key.

The gateway trusts this key only when no identity JWKS is configured and ``VRS_ENVIRONMENT`` is not
``production`` (production refuses it at start). Used by ``vrs token``, the demo seed, the bench and the
end-to-end tests.
"""

from __future__ import annotations

from functools import cache

from services.gateway.tokens import InternalTokenIssuer, principal_claims, sign_es256
from shared.auth import Principal, Role
from shared.dev_keys import DEV_GATEWAY_KID, DEV_GATEWAY_PRIVATE_PEM, DEV_IDENTITY_KID, DEV_IDENTITY_PRIVATE_PEM
from shared.domain.codes import is_valid_institution_code, is_valid_municipality_code
from shared.settings import AuthSettings

# What the gateway's defaults expect (GatewaySettings.identity_issuer / identity_audience).
DEV_ISSUER = "vrs-dev"
DEV_AUDIENCE = "vrs-api"
DEFAULT_TTL_SECONDS = 3600  # the gateway's default maximum lifetime


def identity_token(
    *,
    role: Role,
    subject: str | None = None,
    municipality: str | None = None,
    institution: str | None = None,
    ttl_seconds: int | None = None,
) -> str:
    if role is Role.ANONYMOUS:
        raise ValueError("anonymous callers send no token")
    if role is Role.MUNICIPALITY and not (municipality and is_valid_municipality_code(municipality)):
        raise ValueError("a municipality token needs a valid 6-digit municipality code")
    if role is Role.INSTITUTION and not (institution and is_valid_institution_code(institution)):
        raise ValueError("an institution token needs a 10-digit medical institution code")
    claims = principal_claims(
        Principal.named(role, subject=subject, municipality=municipality, institution=institution),
        issuer=DEV_ISSUER,
        audience=DEV_AUDIENCE,
        ttl_seconds=ttl_seconds or DEFAULT_TTL_SECONDS,
    )
    return sign_es256(DEV_IDENTITY_PRIVATE_PEM, DEV_IDENTITY_KID, claims)


def bearer_headers(role: Role, **claims: str | int | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <development identity token>"}``."""
    return {"Authorization": "Bearer " + identity_token(role=role, **claims)}  # type: ignore[arg-type]


@cache
def dev_gateway_issuer() -> InternalTokenIssuer:
    """What the gateway forwards to the services, signed with the DEVELOPMENT gateway key they trust outside
    production: for calling a service directly, without the gateway's hop (tests, benches)."""
    auth = AuthSettings()
    return InternalTokenIssuer(
        private_pem=DEV_GATEWAY_PRIVATE_PEM,
        kid=DEV_GATEWAY_KID,
        issuer=auth.internal_issuer,
        audience=auth.internal_audience,
        ttl_seconds=auth.internal_token_max_seconds,
    )
