"""Registry's grants: signed, short-lived permissions for records to answer a narrow question.

Two kinds, one mechanism (ES256, registry signs, records holds only the public key):

- a *transfer grant* lets one caller see a few coupons' doses (transfer lookups, below);
- a *dose-version grant* lets registry learn, for the doses its issued certificates show, whether each is
  still at the version the card shows (version, status, voided — nothing about the person).

A municipality may read another municipality's doses only for a transfer lookup of a person now registered
with it (ARCHITECTURE.md, transfer lookups). Registry decides that — it holds the My Number directory — and
records, which holds the doses, must not take a caller's word for it. So registry signs a short-lived grant
naming exactly the caller, the legal basis, the other municipality and the coupon numbers its directory led
to; records shows a caller only the doses of coupons named in a grant made out to that caller, and only
with the caller's own token. Grants are ES256: records holds only the public key, so nothing in records
(or anyone who reads its configuration) can make one.

Certificates are revoked when a dose they show is voided or corrected in records (certificates.py); a verifier
abroad asks registry, with nobody's token. Registry then signs a dose-version grant naming exactly those
certificates' dose ids, valid for seconds: records needs no caller for it, and answers nothing else. Registry
thus holds no standing credential into records — only the power to ask about doses it certified.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import ClassVar, Literal, TypeVar

from jose import JWTError, jwt
from pydantic import BaseModel, Field

from shared.db import utcnow

ALGORITHM = "ES256"
ISSUER = "vrs-registry"
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


class Grant(BaseModel):
    """What every grant shares: its audience (one per question records answers) and how long it lives."""

    AUDIENCE: ClassVar[str]
    LIFETIME: ClassVar[timedelta]
    NAME: ClassVar[str]


class TransferGrant(Grant):
    AUDIENCE = "vrs-records/transfer-doses"
    LIFETIME = timedelta(seconds=60)
    NAME = "transfer grant"

    caller: str = Field(pattern=r"^\d{6}$")  # the municipality doing the lookup
    legal_basis: list[LegalBasis]
    municipality: str = Field(pattern=r"^\d{6}$")  # whose doses may be read
    coupons: list[str] = Field(min_length=1, max_length=10_000)


class CertifiedDoses(BaseModel):
    """One issued certificate and the doses it shows, in the municipality that recorded them."""

    certificate: str = Field(min_length=1, max_length=36)
    municipality: str = Field(pattern=r"^\d{6}$")
    doses: list[str] = Field(min_length=1, max_length=50)


class DoseVersionGrant(Grant):
    # Seconds, not minutes: it is signed just before the one call that uses it.
    AUDIENCE = "vrs-records/dose-versions"
    LIFETIME = timedelta(seconds=15)
    NAME = "dose-version grant"

    MAX_CERTIFICATES: ClassVar[int] = 1000

    certificates: list[CertifiedDoses] = Field(min_length=1, max_length=MAX_CERTIFICATES)

    def dose_ids(self) -> dict[str, str]:
        """Each named dose id → the municipality whose records hold it."""
        return {d: c.municipality for c in self.certificates for d in c.doses}


G = TypeVar("G", bound=Grant)


def sign_grant(private_key: str, grant: Grant, *, lifetime: timedelta | None = None) -> str:
    """``lifetime`` only for tests (an expired grant); grants otherwise live their kind's ``LIFETIME``."""
    now = utcnow()
    claims = grant.model_dump() | {
        "iss": ISSUER,
        "aud": grant.AUDIENCE,
        "jti": str(uuid.uuid4()),
        "iat": int(now.timestamp()),
        "exp": int((now + (grant.LIFETIME if lifetime is None else lifetime)).timestamp()),
    }
    return str(jwt.encode(claims, private_key, algorithm=ALGORITHM))


def open_grant(public_key: str, token: str, kind: type[G]) -> G:
    """The grant, if registry signed it for ``kind``'s audience and it has not expired."""
    try:
        claims = jwt.decode(token, public_key, algorithms=[ALGORITHM], audience=kind.AUDIENCE, issuer=ISSUER)
        return kind.model_validate(claims)
    except (JWTError, ValueError) as exc:
        raise InvalidGrant(f"not a valid {kind.NAME}") from exc


def verify_grant(public_key: str, token: str, *, caller: str) -> TransferGrant:
    """The transfer grant, if registry signed it, it has not expired and it is made out to ``caller``."""
    grant = open_grant(public_key, token, TransferGrant)
    if grant.caller != caller:
        raise InvalidGrant("the grant is made out to another municipality")
    return grant
