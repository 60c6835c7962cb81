"""The gateway's one pipeline: match the policy, authenticate, authorise, forward, audit."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from services.gateway.audit import AuditFacts, AuditTrail, purpose_text
from services.gateway.policy import TABLE, Match, PolicyTable, Upstream, authorize, no_such_endpoint
from services.gateway.proxy import (
    RawHeaders,
    Transport,
    UpstreamTimeout,
    UpstreamUnreachable,
    returned_headers,
)
from shared.auth import Principal, Role, TokenVerifier
from shared.errors import GatewayTimeout, ServiceUnavailable, VRSError, error_response

log = logging.getLogger(__name__)

BodyReader = Callable[[int], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Inbound:
    method: str
    path: str  # percent-decoded: what the policy matches
    raw_path: str  # as received: what is forwarded, so the upstream decodes it exactly as the gateway did
    query_string: str
    headers: dict[str, str]  # only the forwarded ones, lower-case names, ``x-request-id`` always set


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


class Gateway:
    def __init__(
        self,
        *,
        upstreams: Mapping[Upstream, str],
        transport: Transport,
        tokens: TokenVerifier,
        audit: AuditTrail,
        max_body_bytes: int,
        table: PolicyTable = TABLE,
    ) -> None:
        self._upstreams = {name: url.rstrip("/") for name, url in upstreams.items()}
        self._transport = transport
        self._tokens = tokens
        self._audit = audit
        self._max_body_bytes = max_body_bytes
        self._table = table

    async def handle(self, inbound: Inbound, *, read_body: BodyReader) -> Outcome:
        # An encoded slash is never part of an id; refusing it keeps "what was matched" and "what the
        # upstream routes" the same path.
        match = None if "%2f" in inbound.raw_path.lower() else self._table.match(inbound.method, inbound.path)
        if match is None:
            return error_outcome(None, no_such_endpoint())
        rule = match.rule
        try:
            principal = self._tokens.principal(inbound.headers.get("authorization"))
        except VRSError as err:
            return error_outcome(match, err)
        try:
            authorize(match, principal)
        except VRSError as err:
            # A known caller's refused attempt on personal data is worth a record too; it carries no data,
            # so a failing audit log does not change the answer.
            if rule.reads_personal_data and principal.role is not Role.ANONYMOUS:
                try:
                    await self._audit.append(_facts(inbound, match, principal, err.status_code, b""))
                except Exception as exc:
                    log.error("audit entry for a refused request not written: %s", type(exc).__name__)
            return error_outcome(match, err)
        try:
            body = await read_body(self._max_body_bytes)
        except VRSError as err:
            return error_outcome(match, err)

        url = self._upstreams[rule.upstream] + inbound.raw_path
        if inbound.query_string:
            url += "?" + inbound.query_string
        try:
            answer = await self._transport.send(inbound.method, url, inbound.headers, body)
        except UpstreamUnreachable as exc:
            log.warning("%s unreachable for %s %s: %s", rule.upstream, inbound.method, rule.path, exc)
            outcome = error_outcome(match, ServiceUnavailable(f"{rule.upstream} is unreachable"))
        except UpstreamTimeout:
            log.warning("%s timed out for %s %s", rule.upstream, inbound.method, rule.path)
            outcome = error_outcome(match, GatewayTimeout(f"{rule.upstream} did not answer in time"))
        else:
            outcome = Outcome(match, answer.status, returned_headers(answer.headers), answer.body)

        if rule.reads_personal_data:
            # Written before the answer leaves: personal data is never delivered without its record.
            try:
                await self._audit.append(_facts(inbound, match, principal, outcome.status, body))
            except Exception as exc:
                log.error("audit entry not written, answer withheld: %s", type(exc).__name__)
                return error_outcome(match, ServiceUnavailable("the audit log is unavailable"))
        return outcome

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
            raise RuntimeError("; ".join(problems))


def _facts(inbound: Inbound, match: Match, principal: Principal, status: int, body: bytes) -> AuditFacts:
    stated: object = None
    field = match.rule.purpose_field
    if field is not None and body:
        # Only the purpose is taken from the body; the body itself (a My Number, for transfer lookups)
        # is never kept.
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            stated = doc.get(field)
    if not isinstance(stated, str) or not stated.strip():
        stated = inbound.headers.get("x-access-purpose")
    return AuditFacts(
        request_id=inbound.headers["x-request-id"],
        subject=principal.subject,
        role=principal.role.value,
        municipality=principal.municipality,
        institution=principal.institution,
        method=inbound.method,
        path_template=match.rule.path,
        resource_ids=match.params,
        purpose=purpose_text(stated),
        status=status,
    )
