"""The gateway's one pipeline: match the policy, authenticate, limit, authorise, forward, audit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from services.gateway.audit import (
    DEFAULT_LEGAL_BASIS,
    AuditChains,
    AuditFacts,
    AuditUnavailable,
    LegalBasis,
    legal_basis,
)
from services.gateway.limits import RateLimiter, json_depth_exceeds
from services.gateway.policy import TABLE, Body, Match, PolicyTable, Upstream, authorize, no_such_endpoint
from services.gateway.proxy import (
    RawHeaders,
    Transport,
    UpstreamTimeout,
    UpstreamUnreachable,
    returned_headers,
)
from services.gateway.tokens import IdentityVerifier, InternalTokenIssuer
from shared.auth import ANONYMOUS, Principal, Role
from shared.domain.coupon import CouponLineError, parse_coupon_line
from shared.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    InvalidField,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    VRSError,
    error_response,
)
from shared.observability import NotReady

log = logging.getLogger(__name__)

BodyReader = Callable[[int], Awaitable[bytes]]
LocalHandler = Callable[["Inbound", Match, Principal], Awaitable["Outcome"]]
PURPOSE_HEADER = "x-access-purpose"
# Methods that only read: audited by one entry after the service answered, before the answer goes out.
READ_METHODS = frozenset({"GET", "HEAD"})
# What a caller gets when the audit trail cannot take a request's entry: it is not forwarded (a change), or its
# answer is withheld (a read).
AUDIT_UNAVAILABLE = "the audit trail is unavailable; retry"


@dataclass(frozen=True, slots=True)
class Inbound:
    method: str
    path: str  # percent-decoded: what the policy matches
    raw_path: str  # as received: what is forwarded, so the upstream decodes it exactly as the gateway did
    query_string: str
    headers: dict[str, str]  # only the forwarded ones, lower-case names, ``x-request-id`` always set
    client: str = "unknown"  # the peer address: the rate-limit key of anonymous callers


@dataclass(frozen=True, slots=True)
class Outcome:
    match: Match | None
    status: int
    headers: RawHeaders  # without Content-Length and X-Request-ID, which the HTTP layer adds
    body: bytes


def error_outcome(match: Match | None, error: VRSError) -> Outcome:
    # The same renderer as every service's error handler: a refusal here is byte-identical to the
    # service's own answer (the unknown-resident 404 above all).
    response = error_response(error)
    headers = [(k, v) for k, v in response.raw_headers if k != b"content-length"]
    return Outcome(match, error.status_code, headers, bytes(response.body))


@dataclass(frozen=True, slots=True)
class Limits:
    json_body_bytes: int
    import_body_bytes: int
    json_depth: int
    per_principal: RateLimiter
    per_address: RateLimiter


class Gateway:
    def __init__(
        self,
        *,
        upstreams: Mapping[Upstream, str],
        transport: Transport,
        tokens: IdentityVerifier,
        internal_tokens: InternalTokenIssuer,
        audit: AuditChains,
        limits: Limits,
        local: Mapping[str, LocalHandler] | None = None,
        table: PolicyTable = TABLE,
    ) -> None:
        self._upstreams = {name: url.rstrip("/") for name, url in upstreams.items()}
        self._transport = transport
        self._tokens = tokens
        self._internal = internal_tokens
        self._audit = audit
        self._limits = limits
        self._local = dict(local or {})
        self._table = table

    def _body_limit(self, body: Body | None) -> int:
        if body is Body.IMPORT:
            return self._limits.import_body_bytes
        if body is Body.NONE:
            return 0
        return self._limits.json_body_bytes

    async def handle(self, inbound: Inbound, *, read_body: BodyReader) -> Outcome:
        # An encoded slash is never part of an id; refusing it keeps "what was matched" and "what the
        # upstream routes" the same path.
        match = None if "%2f" in inbound.raw_path.lower() else self._table.match(inbound.method, inbound.path)
        if match is None:
            return error_outcome(None, no_such_endpoint())
        rule = match.rule
        try:
            unverified: Unauthorized | None = None
            try:
                principal = self._tokens.principal(inbound.headers.get("authorization"))
            except Unauthorized as err:
                # A token that fails verification names nobody: it takes from its address's bucket, as a caller
                # without one does, so a flood of forged tokens meets 429 like any other flood.
                principal, unverified = ANONYMOUS, err
            if principal.role is Role.ANONYMOUS:
                wait = self._limits.per_address.take(inbound.client)
            else:
                wait = self._limits.per_principal.take(principal.scope_key)
            if wait:
                raise TooManyRequests("too many requests; retry later", retry_after=wait)
            if unverified is not None:
                raise unverified
        except VRSError as err:
            return error_outcome(match, err)
        try:
            authorize(match, principal)
        except VRSError as err:
            # A known caller's refused attempt on personal data is worth a record too; it carries no data,
            # so a failing audit trail does not change the answer.
            # Nobody waits for it: the writer keeps it until it is stored.
            if rule.reads_personal_data and principal.role is not Role.ANONYMOUS:
                try:
                    refused = _facts(inbound, match, principal, DEFAULT_LEGAL_BASIS, err.status_code)
                    self._audit.record(refused)
                except AuditUnavailable as exc:
                    log.error("audit entry for a refused request not written: %s", exc)
            return error_outcome(match, err)
        try:
            body = await read_body(self._body_limit(rule.body))
            if body and rule.body is not Body.IMPORT and json_depth_exceeds(body, self._limits.json_depth):
                raise BadRequest(f"the JSON body is nested deeper than {self._limits.json_depth} levels")
            basis = self._legal_basis(inbound, match, body) if rule.reads_personal_data else DEFAULT_LEGAL_BASIS
        except VRSError as err:
            return error_outcome(match, err)
        whose = None if rule.coupon_field is None else coupons_municipality(body, rule.coupon_field, rule.coupon_items)

        if rule.upstream is Upstream.GATEWAY:
            return await self._local[rule.path](inbound, match, principal)

        url = self._upstreams[rule.upstream] + inbound.raw_path
        if inbound.query_string:
            url += "?" + inbound.query_string
        headers = dict(inbound.headers)
        if rule.purpose_field is not None:
            # The bases the gateway read from the body and audits, whatever the caller sent: registry checks again
            # that they cover every lookup.
            headers[PURPOSE_HEADER] = basis
        # The caller's token stays here: the service gets the gateway's word for who is calling.
        headers["authorization"] = self._internal.authorization(principal)
        audited, intent, chain = rule.reads_personal_data, None, None
        if audited and inbound.method not in READ_METHODS:
            # Recorded before the service acts: if the trail cannot take the entry, the request is refused
            # here and never forwarded, so nothing happens that the trail does not show.
            intent = _facts(inbound, match, principal, basis, None, whose=whose)
            try:
                chain, intent_seq = await self._audit.append(intent)
            except AuditUnavailable as exc:
                log.error("audit intent not written, request refused before forwarding: %s", exc)
                return error_outcome(match, ServiceUnavailable(AUDIT_UNAVAILABLE))
        outcome = await self._forward(inbound, match, url, headers, body)
        if chain is not None and intent is not None:
            # The service has acted (or failed): its answer goes out whatever happens to the audit database
            # now — the writer retries the outcome entry until it is stored, nobody waits for it.
            try:
                chain.record(intent.with_outcome(outcome.status, intent_seq))
            except AuditUnavailable as exc:
                log.error("audit outcome of intent %d not written: %s", intent_seq, exc)
        elif audited:
            # A read changes nothing until its answer leaves the gateway: one entry, with the status the caller
            # gets, committed before the answer goes out. If the trail cannot take it, the answer is dropped.
            try:
                await self._audit.append(_facts(inbound, match, principal, basis, outcome.status))
            except AuditUnavailable as exc:
                log.error("audit entry of a read not written, answer withheld: %s", exc)
                return error_outcome(match, ServiceUnavailable(AUDIT_UNAVAILABLE))
        return outcome

    async def _forward(self, inbound: Inbound, match: Match, url: str, headers: dict[str, str], body: bytes) -> Outcome:
        rule = match.rule
        try:
            answer = await self._transport.send(inbound.method, url, headers, body)
        except UpstreamUnreachable as exc:
            log.warning("%s unreachable for %s %s: %s", rule.upstream, inbound.method, rule.path, exc)
            return error_outcome(match, BadGateway("the service behind this path is unavailable; retry"))
        except UpstreamTimeout:
            log.warning("%s timed out for %s %s", rule.upstream, inbound.method, rule.path)
            return error_outcome(match, GatewayTimeout("the service behind this path did not answer in time"))
        return Outcome(match, answer.status, returned_headers(answer.headers), answer.body)

    @staticmethod
    def _legal_basis(inbound: Inbound, match: Match, body: bytes) -> str:
        """The legal basis of the access, from the fixed list: for a route whose body states it, what the body
        states (a batch's bases sorted, comma-separated), else what ``X-Access-Purpose`` names."""
        field = match.rule.purpose_field
        if field is not None:
            return ",".join(sorted(_stated_bases(body, field, match.rule.purpose_items)))
        header = inbound.headers.get(PURPOSE_HEADER)
        if header is None:
            return DEFAULT_LEGAL_BASIS
        basis = legal_basis(header.strip())
        if basis is None:
            raise InvalidField("X-Access-Purpose", "must be one of " + ", ".join(b.value for b in LegalBasis))
        return basis

    async def check_upstreams(self, *, timeout: float) -> None:
        """Raise unless every upstream's ``/healthz`` answers 200 within ``timeout`` seconds."""

        async def check(name: Upstream, base: str) -> str | None:
            try:
                async with asyncio.timeout(timeout):
                    answer = await self._transport.send("GET", base + "/healthz", {}, b"")
            except (UpstreamUnreachable, UpstreamTimeout, TimeoutError) as exc:
                return f"{name}: {type(exc).__name__}"
            return None if answer.status == 200 else f"{name}: /healthz answered {answer.status}"

        problems = [p for p in await asyncio.gather(*(check(n, b) for n, b in self._upstreams.items())) if p]
        if problems:
            raise NotReady("; ".join(problems))


def _stated_bases(body: bytes, field: str, items_field: str | None) -> set[str]:
    """The legal bases a transfer lookup's body states in ``field``: its own, or each item's of its ``items_field``
    list (a batch). One missing or not consent or my-number-act-19-16 is refused, naming its field
    (``lookups[3].legal_basis``)."""
    try:
        doc = json.loads(body) if body else None
    except (ValueError, RecursionError):
        doc = None
    if items_field is None:
        statements = [(field, doc)]
    else:
        items = doc.get(items_field) if isinstance(doc, dict) else None
        if not isinstance(items, list) or not items:
            raise InvalidField(items_field, f"must be a non-empty list, each item with its {field}")
        statements = [(f"{items_field}[{i}].{field}", item) for i, item in enumerate(items)]
    bases = set()
    for name, statement in statements:
        basis = legal_basis(statement.get(field) if isinstance(statement, dict) else None)
        if basis is None or basis is LegalBasis.ADMINISTRATION:
            raise InvalidField(name, "must be consent or my-number-act-19-16")
        bases.add(basis.value)
    return bases


def coupons_municipality(body: bytes, field: str, items_field: str | None) -> str | None:
    """Whose data a dose write is: the municipality of the coupon line in the body's ``field`` (in each item's, of
    its ``items_field`` list: a batch), when the lines that can be coupons are all one municipality's. Otherwise
    None: the entry then names no municipality (records answers what is wrong with a line)."""
    try:
        doc = json.loads(body) if body else None
    except (ValueError, RecursionError):
        return None
    items = [doc] if items_field is None else (doc.get(items_field) if isinstance(doc, dict) else None)
    codes = set()
    for item in items if isinstance(items, list) else ():
        line = item.get(field) if isinstance(item, dict) else None
        if isinstance(line, str):
            with contextlib.suppress(CouponLineError):
                codes.add(parse_coupon_line(line).municipality_code)
    return codes.pop() if len(codes) == 1 else None


def _facts(
    inbound: Inbound,
    match: Match,
    principal: Principal,
    basis: str,
    outcome: int | None,
    *,
    whose: str | None = None,
) -> AuditFacts:
    """The audit entry of a request. Whose data: ``whose`` (a dose's coupon), else the municipality in the path,
    else the caller's own."""
    return AuditFacts(
        request_id=inbound.headers["x-request-id"],
        principal=principal.subject,
        role=principal.role.value,
        caller_municipality=principal.municipality,
        institution=principal.institution,
        municipality=whose or match.params.get("code", principal.municipality),
        action=f"{inbound.method} {match.rule.path}",
        resource=inbound.path,
        legal_basis=basis,
        outcome=outcome,
    )
