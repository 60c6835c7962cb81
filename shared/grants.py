"""Transfer-lookup grants: registry's signed permission for records to show one caller a few coupons' doses.

A municipality may read another municipality's doses only for a transfer lookup of a person now registered
with it (ARCHITECTURE.md, transfer lookups). Registry decides that — it holds the My Number directory — and
records, which holds the doses, must not take a caller's word for it. So registry signs a short-lived grant
naming exactly the caller, the legal basis, the other municipality and the coupon numbers its directory led
to; records shows a caller only the doses of coupons named in a grant made out to that caller, and only
with the caller's own token. Grants are ES256: records holds only the public key, so nothing in records
(or anyone who reads its configuration) can make one.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Literal

from jose import JWTError, jwt
from pydantic import BaseModel, Field

from shared.db import utcnow

ALGORITHM = "ES256"
ISSUER = "vrs-registry"
AUDIENCE = "vrs-records/transfer-doses"
LIFETIME = timedelta(seconds=60)
LegalBasis = Literal["consent", "my-number-act-19-16"]  # 本人同意, 番号法第19条第16号

# Public development pair: the stack trusts it in development and test; production refuses it.
DEV_PRIVATE_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgNA4uiV+Bpup4XNaD
7yFy76f/p9KtSRgF8e0b/tbYEiahRANCAATprSrnKxmCobBruL+uhtUUrRTVjHRm
uoZvNq4bFTdnbYeY+uVM/jxnZrOJHWMKIXVAqaH0M4BjRGm2XHlYEVpl
-----END PRIVATE KEY-----
"""
DEV_PUBLIC_KEY = """-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE6a0q5ysZgqGwa7i/robVFK0U1Yx0
ZrqGbzauGxU3Z22HmPrlTP48Z2aziR1jCiF1QKmh9DOAY0Rptlx5WBFaZQ==
-----END PUBLIC KEY-----
"""


class InvalidGrant(ValueError):
    pass


class TransferGrant(BaseModel):
    caller: str = Field(pattern=r"^\d{6}$")  # the municipality doing the lookup
    legal_basis: list[LegalBasis]
    municipality: str = Field(pattern=r"^\d{6}$")  # whose doses may be read
    coupons: list[str] = Field(min_length=1, max_length=10_000)


def sign_grant(private_key: str, grant: TransferGrant) -> str:
    now = utcnow()
    claims = grant.model_dump() | {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "jti": str(uuid.uuid4()),
        "iat": int(now.timestamp()),
        "exp": int((now + LIFETIME).timestamp()),
    }
    return str(jwt.encode(claims, private_key, algorithm=ALGORITHM))


def verify_grant(public_key: str, token: str, *, caller: str) -> TransferGrant:
    """The grant, if registry signed it, it has not expired and it is made out to ``caller``."""
    try:
        claims = jwt.decode(token, public_key, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=ISSUER)
        grant = TransferGrant.model_validate(claims)
    except (JWTError, ValueError) as exc:
        raise InvalidGrant("not a valid transfer grant") from exc
    if grant.caller != caller:
        raise InvalidGrant("the grant is made out to another municipality")
    return grant
