"""Bearer tokens and the principal they name.

Two kinds of token, both asymmetric (ES256 or RS256) and both carrying a ``kid``:

- **identity tokens**, from the identity provider to callers; only the gateway verifies them, against the
  provider's JWKS (``services/gateway/tokens.py``);
- **internal tokens**, minted by the gateway for each verified caller and forwarded to the services in the
  ``Authorization`` header. A service trusts nothing else: :class:`GatewayOnly` refuses every request
  without a valid one (a call straight to a service port included), and the services hold only the
  gateway's *public* keys. Service-to-service reads forward the same token (:data:`forwarded_authorization`),
  so the callee sees the original caller and re-checks its scope — there is no all-powerful service role.

The checks are done here rather than by python-jose's ``jwt.decode`` so that every refusal is our own short
sentence: no library message ever reaches a response.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Depends, Request
from jose import jwk, jws
from jose.exceptions import JOSEError
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.domain.codes import is_valid_institution_code, is_valid_municipality_code
from shared.errors import Forbidden, Unauthorized, VRSError, error_response
from shared.settings import AuthSettings

log = logging.getLogger(__name__)


class Role(StrEnum):
    MUNICIPALITY = "municipality"
    INSTITUTION = "institution"
    NATIONAL = "national"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    subject: str
    municipality: str | None = None
    institution: str | None = None

    @classmethod
    def named(
        cls, role: Role, *, subject: str | None = None, municipality: str | None = None, institution: str | None = None
    ) -> Principal:
        """A principal whose subject defaults to its organisation code (or its role)."""
        return cls(
            role=role,
            subject=subject or municipality or institution or role.value,
            municipality=municipality if role is Role.MUNICIPALITY else None,
            institution=institution if role is Role.INSTITUTION else None,
        )

    @property
    def scope_key(self) -> str:
        """What scopes idempotency keys and audit entries: the organisation, not the device."""
        if self.role is Role.MUNICIPALITY:
            return f"municipality:{self.municipality}"
        if self.role is Role.INSTITUTION:
            return f"institution:{self.institution}"
        return f"{self.role.value}:{self.subject}"


ANONYMOUS = Principal(role=Role.ANONYMOUS, subject="anonymous")

# The only algorithms accepted, each tied to the one key type it may be used with: a token cannot choose
# HS256 (and have an RSA/EC public key used as its HMAC secret) or ``none``.
ALGORITHM_OF_KEY_TYPE = {"EC": "ES256", "RSA": "RS256"}
_MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class PublicKey:
    kid: str
    alg: str
    key: Any  # python-jose key object, built once
    jwk: dict[str, Any]  # the public JWK as published


class Keyset:
    """Public keys by ``kid``, parsed from a JWKS document: the signing keys of an allowed type. Every key needs a
    ``kid``; others (an identity provider's encryption keys, key types we do not verify with) are skipped."""

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        self._keys = {k.kid: k for k in keys}

    @classmethod
    def from_jwks(cls, document: str | Mapping[str, Any]) -> Keyset:
        """Raises ``ValueError`` naming what is wrong (never a private key: ``d`` is refused). A keyset left with no
        key is its caller's to refuse, in its own words."""
        doc = json.loads(document) if isinstance(document, str) else document
        if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
            raise ValueError("a JWKS is an object with a 'keys' list")
        keys = []
        for raw in doc["keys"]:
            if not isinstance(raw, Mapping):
                raise ValueError("each JWKS key is an object")
            kid, kty = raw.get("kid"), raw.get("kty")
            if not isinstance(kid, str) or not kid:
                raise ValueError("every JWKS key needs a 'kid'")
            if "d" in raw:
                raise ValueError(f"key {kid}: a JWKS publishes public keys only")
            alg = ALGORITHM_OF_KEY_TYPE.get(str(kty))
            # Identity providers publish encryption keys ("use": "enc", RSA-OAEP) and keys of other types beside
            # their signing keys: tokens we accept are never signed with those, so they are left out, not fatal.
            if raw.get("use", "sig") != "sig":
                _skipped(kid, "not a signing key (use is not sig)")
                continue
            if alg is None or raw.get("alg", alg) != alg or (kty == "EC" and raw.get("crv") != "P-256"):
                _skipped(kid, "only EC P-256 (ES256) and RSA (RS256) keys are used")
                continue
            if kty == "RSA" and len(_b64decode(str(raw.get("n", "")))) * 8 < _MIN_RSA_BITS:
                raise ValueError(f"key {kid}: RSA keys need at least {_MIN_RSA_BITS} bits")
            try:
                key = jwk.construct(dict(raw), alg)
            except (JOSEError, ValueError, TypeError) as exc:
                raise ValueError(f"key {kid}: not a valid {alg} key") from exc
            keys.append(PublicKey(kid=kid, alg=alg, key=key, jwk=dict(raw)))
        if len({k.kid for k in keys}) != len(keys):
            raise ValueError("two JWKS keys share a kid")
        return cls(keys)

    def get(self, kid: str) -> PublicKey | None:
        return self._keys.get(kid)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk for k in self._keys.values()]}

    def __len__(self) -> int:
        return len(self._keys)


@functools.lru_cache(maxsize=1024)
def _skipped(kid: str, reason: str) -> None:
    # Once a key: the gateway reads its identity provider's JWKS again every few minutes. The kid, never the key.
    log.warning("JWKS key %s skipped: %s", kid, reason)


@dataclass(frozen=True, slots=True)
class TokenRules:
    issuer: str
    audience: str
    max_lifetime_seconds: int  # exp - iat may not exceed this
    leeway_seconds: int  # clock skew allowed on exp, nbf and iat


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _invalid(reason: str) -> Unauthorized:
    return Unauthorized(f"invalid token: {reason}")


def unverified_header(token: str) -> dict[str, Any]:
    try:
        header = json.loads(_b64decode(token.split(".", 1)[0]))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _invalid("malformed") from None
    if not isinstance(header, dict):
        raise _invalid("malformed")
    return header


def verify_jwt(
    token: str, keyset: Keyset, rules: TokenRules, *, now: float | None = None
) -> tuple[dict[str, Any], str]:
    """(claims, kid) of a token signed by a key of ``keyset`` under ``rules``; raises :class:`Unauthorized`."""
    if token.count(".") != 2:
        raise _invalid("malformed")
    header = unverified_header(token)
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise _invalid("no key id (kid)")
    key = keyset.get(kid)
    if key is None:
        raise _invalid("unknown key id")
    if header.get("alg") != key.alg:
        raise _invalid(f"algorithm must be {key.alg} for this key")
    try:
        payload = jws.verify(token, key.key, algorithms=[key.alg])
        claims = json.loads(payload)
    except (JOSEError, ValueError, UnicodeDecodeError):
        raise _invalid("bad signature") from None
    if not isinstance(claims, dict):
        raise _invalid("claims are not an object")
    now = time.time() if now is None else now
    leeway = rules.leeway_seconds
    exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise _invalid("exp is required")
    if not isinstance(iat, int | float) or isinstance(iat, bool):
        raise _invalid("iat is required")
    if exp <= now - leeway:
        raise _invalid("expired")
    if iat > now + leeway or (nbf is not None and (not isinstance(nbf, int | float) or nbf > now + leeway)):
        raise _invalid("not yet valid")
    if exp - iat > rules.max_lifetime_seconds:
        raise _invalid(f"lifetime over the maximum of {rules.max_lifetime_seconds} s")
    if claims.get("iss") != rules.issuer:
        raise _invalid("wrong issuer")
    aud = claims.get("aud")
    if not (aud == rules.audience or (isinstance(aud, list) and rules.audience in aud)):
        raise _invalid("wrong audience")
    return claims, kid


def principal_from_claims(claims: Mapping[str, Any], *, allow_anonymous: bool = False) -> Principal:
    try:
        role = Role(str(claims.get("role")))
    except ValueError:
        raise _invalid("unknown role") from None
    if role is Role.ANONYMOUS and not allow_anonymous:
        raise _invalid("anonymous is not a token role")
    municipality = claims.get("municipality")
    institution = claims.get("institution")
    if role is Role.MUNICIPALITY and not (isinstance(municipality, str) and is_valid_municipality_code(municipality)):
        raise _invalid("municipality claim missing or invalid")
    if role is Role.INSTITUTION and not (isinstance(institution, str) and is_valid_institution_code(institution)):
        raise _invalid("institution claim missing or invalid")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise _invalid("sub is required")
    return Principal(
        role=role,
        subject=subject,
        municipality=municipality if role is Role.MUNICIPALITY else None,
        institution=institution if role is Role.INSTITUTION else None,
    )


def bearer(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization header must be 'Bearer <token>'")
    return token.strip()


class TokenCache:
    """Verified tokens by raw header value, each until the earlier of its ``exp`` and ``ttl`` from now.

    A verification costs 100-200 µs (ES256); devices send the same token for its whole life, so the cache
    saves most of a core at thousands of requests per second. Entries remember their ``kid``:
    :meth:`drop_kids` forgets every token of a key that left the keyset, so no entry outlives its key.
    """

    def __init__(self, *, size: int, ttl_seconds: float) -> None:
        self._size = size
        self._ttl = ttl_seconds
        self._entries: OrderedDict[str, tuple[Principal, float, str]] = OrderedDict()

    def get(self, authorization: str, now: float) -> Principal | None:
        hit = self._entries.get(authorization)
        if hit is None:
            return None
        if hit[1] <= now:
            del self._entries[authorization]
            return None
        self._entries.move_to_end(authorization)
        return hit[0]

    def put(self, authorization: str, principal: Principal, *, exp: float, kid: str, now: float) -> None:
        if not self._size:
            return
        self._entries[authorization] = (principal, min(exp, now + self._ttl), kid)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def drop_kids(self, kids: Iterable[str]) -> int:
        gone = set(kids)
        stale = [token for token, (_, _, kid) in self._entries.items() if kid in gone]
        for token in stale:
            del self._entries[token]
        return len(stale)

    def __len__(self) -> int:
        return len(self._entries)


def internal_rules(settings: AuthSettings) -> TokenRules:
    return TokenRules(
        issuer=settings.internal_issuer,
        audience=settings.internal_audience,
        max_lifetime_seconds=settings.internal_token_max_seconds,
        leeway_seconds=settings.clock_skew_seconds,
    )


class InternalTokenVerifier:
    """What a service uses: the gateway's internal tokens, verified with the gateway's public keys only."""

    def __init__(self, settings: AuthSettings) -> None:
        self._keyset = Keyset.from_jwks(settings.gateway_jwks)
        self._rules = internal_rules(settings)
        self._cache = TokenCache(size=settings.token_cache_size, ttl_seconds=settings.internal_token_max_seconds)

    def principal(self, authorization: str | None) -> Principal:
        """The caller the gateway vouches for; raises ``Unauthorized`` without a valid internal token."""
        if not authorization:
            raise Unauthorized("requests reach this service through the gateway only")
        now = time.time()
        hit = self._cache.get(authorization, now)
        if hit is not None:
            return hit
        claims, kid = verify_jwt(bearer(authorization), self._keyset, self._rules, now=now)
        principal = principal_from_claims(claims, allow_anonymous=True)
        self._cache.put(authorization, principal, exp=float(claims["exp"]), kid=kid, now=now)
        return principal

    def __len__(self) -> int:
        return len(self._cache)


# The internal token of the request being served: service-to-service reads forward it (shared.internal), so
# the callee sees the original caller, never a service identity.
forwarded_authorization: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "forwarded_authorization", default=None
)

# Paths a service answers without a token: probes and metrics only, never data.
UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class GatewayOnly:
    """ASGI middleware of every service: no valid internal token, no answer (401), whatever the path."""

    def __init__(
        self, app: ASGIApp, *, verifier: InternalTokenVerifier, grant_only_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.verifier = verifier
        # Paths whose endpoint checks a registry-signed grant instead (shared/grants.py): asked with no caller.
        self.open_paths = UNAUTHENTICATED_PATHS | grant_only_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            principal = self.verifier.principal(authorization)
        except VRSError as err:
            await error_response(err)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        token = forwarded_authorization.set(authorization)
        try:
            await self.app(scope, receive, send)
        finally:
            forwarded_authorization.reset(token)


async def _principal(request: Request) -> Principal:
    # async: a plain `def` dependency would cost a thread-pool hop on every request.
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    if principal is None:  # GatewayOnly not installed: never trust an unverified request
        raise Unauthorized("requests reach this service through the gateway only")
    return principal


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
    """A municipality acts on its own code only; nobody else acts on a municipality's personal data.

    ``deny`` is what a stranger gets; for personal data it must be the very answer an unknown id gets, so
    that nobody learns whether another municipality has a given resident.
    """
    if principal.role is Role.MUNICIPALITY and principal.municipality == code:
        return
    raise deny or Forbidden("this municipality is not yours")
