"""Every route of the policy table × every role × own/foreign municipality, through the gateway.

The expectations are written out for the contract routes, so a policy change shows up here as a diff. A rule
added without a row (other work merging into the table) is still exercised, with what its fields say.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest

from services.gateway.policy import POLICY, Rule, Scope, Upstream
from shared.auth import Role
from tests.integration.services.gateway.gateway_fakes import KNOWN_RESIDENT, FakeUpstream

Token = Callable[..., dict[str, str]]
CHIYODA, SAPPORO, CLINIC = "131016", "011002", "1312345678"
M = "/api/v1/municipalities/{code}"

# Callers: a municipality on its own code, the same municipality on another's, an institution, national, nobody.
CALLERS = ("own", "foreign", "institution", "national", "anonymous")
FWD = "forwarded"  # reaches the service; what it answers is the service's business
LOCAL = "local"  # answered by the gateway itself (200)
# Each row: what each caller gets, in CALLERS order.
MUNI_ONLY = (FWD, 403, 403, 403, 401)
MUNI_HIDDEN = (FWD, 404, 403, 403, 401)
DOSE_WRITERS = (FWD, FWD, FWD, 403, 401)
ANYONE = (FWD, FWD, FWD, FWD, FWD)
MATRIX: dict[tuple[str, str], tuple[object, ...]] = {
    ("PUT", f"{M}/residents/{{resident_id}}"): MUNI_ONLY,
    ("GET", f"{M}/residents/{{resident_id}}"): MUNI_HIDDEN,
    ("POST", f"{M}/resident-imports"): MUNI_ONLY,
    ("GET", f"{M}/resident-imports/{{import_id}}"): MUNI_ONLY,
    ("POST", f"{M}/residents/{{resident_id}}/move-out"): MUNI_ONLY,
    ("POST", f"{M}/transfer-lookups"): MUNI_HIDDEN,
    ("POST", f"{M}/transfer-lookups/batch"): MUNI_HIDDEN,
    ("POST", f"{M}/residents/{{resident_id}}/coupon-reissue"): MUNI_ONLY,
    ("POST", "/api/v1/doses"): DOSE_WRITERS,
    ("POST", "/api/v1/doses/batch"): DOSE_WRITERS,
    ("POST", "/api/v1/dose-imports"): DOSE_WRITERS,
    ("GET", "/api/v1/dose-imports/{import_id}"): DOSE_WRITERS,
    ("GET", "/api/v1/coupons/{coupon}"): DOSE_WRITERS,
    ("GET", f"{M}/doses"): MUNI_ONLY,
    ("POST", f"{M}/doses/{{dose_id}}/corrections"): MUNI_ONLY,
    ("GET", "/api/v1/stats/doses"): ANYONE,
    ("GET", "/api/v1/opendata/{file}"): ANYONE,
    ("GET", "/api/v1/stats/coverage"): ANYONE,
    ("GET", "/dashboard"): ANYONE,
    ("GET", "/dashboard/{asset}"): ANYONE,
    ("GET", f"{M}/audit"): (LOCAL, 403, 403, 403, 401),
    ("POST", f"{M}/residents/{{resident_id}}/certificates"): MUNI_HIDDEN,
    ("GET", f"{M}/residents/{{resident_id}}/fhir"): MUNI_HIDDEN,
    ("GET", f"{M}/residents/{{resident_id}}/disclosures"): MUNI_HIDDEN,
    ("GET", f"{M}/disclosures"): MUNI_ONLY,
    ("POST", "/api/v1/certificates/verify"): ANYONE,
    ("GET", "/issuer/.well-known/jwks.json"): ANYONE,
    ("GET", "/issuer/.well-known/crl/{file}"): ANYONE,
}


def derived(rule: Rule) -> tuple[object, ...]:
    """What a rule's fields promise, for rules merged in without a row of their own."""
    if rule.roles is None:
        return ANYONE
    ok: object = LOCAL if rule.upstream is Upstream.GATEWAY else FWD
    if rule.roles == frozenset({Role.MUNICIPALITY}):
        hidden = rule.scope is Scope.OWN_MUNICIPALITY_HIDDEN
        return (ok, 404 if hidden else 403, 403, 403, 401)
    return tuple(
        (ok if role in rule.roles else (401 if role is Role.ANONYMOUS else 403))
        for role in (Role.MUNICIPALITY, Role.MUNICIPALITY, Role.INSTITUTION, Role.NATIONAL, Role.ANONYMOUS)
    )


ROUTES = sorted({(method, r.path) for r in POLICY for method in r.methods})


def test_the_written_rows_agree_with_the_rules() -> None:
    for (method, template), row in MATRIX.items():
        rule = next(r for r in POLICY if r.path == template and method in r.methods)
        assert derived(rule) == row, (method, template)


def concrete(template: str) -> str:
    """Always Chiyoda's path: the foreign caller is Sapporo asking for it."""
    path = template.replace("{code}", CHIYODA).replace("{resident_id}", KNOWN_RESIDENT)
    return re.sub(r"\{[a-z_]+\}", "x-1", path.replace("{file}", "prefecture.ndjson"))


def headers_of(caller: str, token: Token) -> dict[str, str]:
    if caller == "anonymous":
        return {}
    claims: dict[str, dict[str, object]] = {
        "own": {"role": Role.MUNICIPALITY, "municipality": CHIYODA},
        "foreign": {"role": Role.MUNICIPALITY, "municipality": SAPPORO},
        "institution": {"role": Role.INSTITUTION, "institution": CLINIC},
        "national": {"role": Role.NATIONAL},
    }
    return token(**claims[caller])


BODY = b'{"legal_basis":"consent","my_number":"x"}'
# A batch states a legal basis per item.
BATCH_BODY = b'{"lookups":[{"client_id":"a","legal_basis":"consent","my_number":"x"}]}'


@pytest.mark.parametrize(("method", "template"), ROUTES)
async def test_route_by_role_by_municipality(
    client: httpx.AsyncClient, token: Token, upstreams: dict[str, FakeUpstream], method: str, template: str
) -> None:
    rule = next(r for r in POLICY if r.path == template and method in r.methods)
    for caller, expected in zip(CALLERS, MATRIX.get((method, template)) or derived(rule), strict=True):
        before = sum(len(u.seen) for u in upstreams.values())
        response = await client.request(
            method,
            concrete(template),
            content=None if method == "GET" else BODY if rule.purpose_items is None else BATCH_BODY,
            headers={**headers_of(caller, token), "Content-Type": "application/json"},
        )
        forwarded = sum(len(u.seen) for u in upstreams.values()) - before
        where = (caller, method, template, response.status_code, response.text[:200])
        if expected == FWD:
            assert forwarded == 1, where
            assert rule.upstream is not Upstream.GATEWAY
        elif expected == LOCAL:
            assert (forwarded, response.status_code) == (0, 200), where
        else:
            assert (forwarded, response.status_code) == (0, expected), where
