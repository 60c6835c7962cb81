"""The policy table: which path goes where, and who may call it."""

from __future__ import annotations

import pytest

from services.gateway.policy import (
    POLICY,
    TABLE,
    Body,
    PolicyTable,
    Scope,
    Upstream,
    authorize,
    rule,
)
from shared.auth import ANONYMOUS, Principal, Role
from shared.errors import RESIDENT_NOT_FOUND, Forbidden, NotFound, Unauthorized, VRSError

M = "/api/v1/municipalities"


@pytest.mark.parametrize(
    ("method", "path", "template", "upstream", "params"),
    [
        ("PUT", f"{M}/131016/residents/r-1", f"{M}/{{code}}/residents/{{resident_id}}", "registry",
         {"code": "131016", "resident_id": "r-1"}),
        ("GET", f"{M}/131016/residents/r-1", f"{M}/{{code}}/residents/{{resident_id}}", "registry",
         {"code": "131016", "resident_id": "r-1"}),
        ("POST", f"{M}/131016/resident-imports", f"{M}/{{code}}/resident-imports", "registry", {"code": "131016"}),
        ("GET", f"{M}/131016/resident-imports/imp-9", f"{M}/{{code}}/resident-imports/{{import_id}}", "registry",
         {"code": "131016", "import_id": "imp-9"}),
        ("POST", f"{M}/131016/residents/r-1/move-out", f"{M}/{{code}}/residents/{{resident_id}}/move-out",
         "registry", {"code": "131016", "resident_id": "r-1"}),
        ("POST", f"{M}/131016/transfer-lookups", f"{M}/{{code}}/transfer-lookups", "registry", {"code": "131016"}),
        ("GET", f"{M}/131016/residents/r-1/disclosures", f"{M}/{{code}}/residents/{{resident_id}}/disclosures",
         "registry", {"code": "131016", "resident_id": "r-1"}),
        ("GET", f"{M}/131016/disclosures", f"{M}/{{code}}/disclosures", "registry", {"code": "131016"}),
        ("POST", "/api/v1/doses", "/api/v1/doses", "records", {}),
        ("POST", "/api/v1/doses/batch", "/api/v1/doses/batch", "records", {}),
        ("GET", f"{M}/131016/doses", f"{M}/{{code}}/doses", "records", {"code": "131016"}),
        ("POST", f"{M}/131016/doses/d-1/corrections", f"{M}/{{code}}/doses/{{dose_id}}/corrections", "records",
         {"code": "131016", "dose_id": "d-1"}),
        ("GET", "/api/v1/stats/doses", "/api/v1/stats/doses", "stats", {}),
        ("GET", "/api/v1/stats/coverage", "/api/v1/stats/coverage", "stats", {}),
        ("GET", "/dashboard/echarts.min.js", "/dashboard/{asset}", "stats", {"asset": "echarts.min.js"}),
        ("GET", "/api/v1/opendata/prefecture.ndjson", "/api/v1/opendata/{file}", "stats",
         {"file": "prefecture.ndjson"}),
        ("GET", "/api/v1/opendata/summary_by_date.csv", "/api/v1/opendata/{file}", "stats",
         {"file": "summary_by_date.csv"}),
        ("GET", "/dashboard", "/dashboard", "stats", {}),
        ("GET", f"{M}/131016/audit", f"{M}/{{code}}/audit", "gateway", {"code": "131016"}),
        # An id that spells a literal segment of another rule is still an id.
        ("GET", f"{M}/131016/residents/doses", f"{M}/{{code}}/residents/{{resident_id}}", "registry",
         {"code": "131016", "resident_id": "doses"}),
    ],
)  # fmt: skip
def test_contract_paths_match_their_rule(
    method: str, path: str, template: str, upstream: str, params: dict[str, str]
) -> None:
    match = TABLE.match(method, path)
    assert match is not None
    assert match.rule.path == template
    assert match.rule.upstream == Upstream(upstream)
    assert match.params == params


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/internal/v1/coupon-lookups"),
        ("POST", "/internal/v1/coupon-lookups"),
        ("GET", f"{M}/131016/internal"),
        ("GET", "/api/v1/doses"),  # method not in the table
        ("DELETE", f"{M}/131016/residents/r-1"),
        ("HEAD", "/dashboard"),
        ("GET", "/api/v1/doses/"),  # trailing slash
        ("GET", "/api/v1/stats/doses/extra"),
        ("GET", "/api/v2/stats/doses"),
        ("GET", "/"),
        ("GET", ""),
        ("GET", "api/v1/stats/doses"),
        ("GET", f"{M}//residents/r-1"),  # empty parameter
        ("GET", f"{M}/131016/residents/.."),
        ("GET", f"{M}/131016/residents/."),
        ("GET", f"{M}/../residents/r-1"),
        ("GET", f"{M}/131016/residents/r-1/../../../../internal/v1/coupon-lookups"),
        ("GET", "/docs"),
        ("GET", "/healthz"),  # the gateway's own; never forwarded
    ],
)
def test_anything_else_matches_nothing(method: str, path: str) -> None:
    assert TABLE.match(method, path) is None


def test_every_read_or_write_of_personal_data_is_audited() -> None:
    audited = {(m, r.path) for r in POLICY if r.reads_personal_data for m in r.methods}
    assert audited >= {
        ("POST", "/api/v1/doses"),
        ("POST", "/api/v1/doses/batch"),
        ("POST", f"{M}/{{code}}/resident-imports"),
        ("PUT", f"{M}/{{code}}/residents/{{resident_id}}"),
        ("GET", f"{M}/{{code}}/residents/{{resident_id}}"),
        ("POST", f"{M}/{{code}}/residents/{{resident_id}}/move-out"),
        ("POST", f"{M}/{{code}}/residents/{{resident_id}}/certificates"),
        ("GET", f"{M}/{{code}}/residents/{{resident_id}}/fhir"),
        ("GET", f"{M}/{{code}}/residents/{{resident_id}}/disclosures"),
        ("GET", f"{M}/{{code}}/disclosures"),
        ("POST", f"{M}/{{code}}/transfer-lookups"),
        ("GET", f"{M}/{{code}}/doses"),
        ("POST", f"{M}/{{code}}/doses/{{dose_id}}/corrections"),
    }


CHIYODA = Principal(role=Role.MUNICIPALITY, subject="131016", municipality="131016")
SAPPORO = Principal(role=Role.MUNICIPALITY, subject="011002", municipality="011002")
CLINIC = Principal(role=Role.INSTITUTION, subject="1312345678", institution="1312345678")
NATIONAL = Principal(role=Role.NATIONAL, subject="mhlw")

OK = None
UNAUTHORIZED = (Unauthorized, "a bearer token is required")
NOT_YOURS = (Forbidden, "this municipality is not yours")
HIDDEN = (NotFound, RESIDENT_NOT_FOUND)


def role_refused(role: str) -> tuple[type[VRSError], str]:
    return (Forbidden, f"role '{role}' may not do this")


@pytest.mark.parametrize(
    ("principal", "method", "path", "expected"),
    [
        # registry: municipalities, their own code only
        (CHIYODA, "GET", f"{M}/131016/residents/r-1", OK),
        (CHIYODA, "PUT", f"{M}/131016/residents/r-1", OK),
        (CHIYODA, "POST", f"{M}/131016/transfer-lookups", OK),
        (CHIYODA, "POST", f"{M}/131016/resident-imports", OK),
        (SAPPORO, "GET", f"{M}/131016/residents/r-1", HIDDEN),  # a stranger learns nothing
        (SAPPORO, "POST", f"{M}/131016/transfer-lookups", HIDDEN),
        (SAPPORO, "PUT", f"{M}/131016/residents/r-1", NOT_YOURS),
        (SAPPORO, "POST", f"{M}/131016/residents/r-1/move-out", NOT_YOURS),
        (SAPPORO, "POST", f"{M}/131016/resident-imports", NOT_YOURS),
        (SAPPORO, "GET", f"{M}/131016/resident-imports/imp-1", NOT_YOURS),
        (CLINIC, "GET", f"{M}/131016/residents/r-1", role_refused("institution")),
        (NATIONAL, "GET", f"{M}/131016/residents/r-1", role_refused("national")),
        (ANONYMOUS, "GET", f"{M}/131016/residents/r-1", UNAUTHORIZED),
        (ANONYMOUS, "POST", f"{M}/131016/transfer-lookups", UNAUTHORIZED),
        # certificates: issued for own residents only; checked and their keys read by anyone
        (CHIYODA, "POST", f"{M}/131016/residents/r-1/certificates", OK),
        (CHIYODA, "GET", f"{M}/131016/residents/r-1/fhir", OK),
        (SAPPORO, "POST", f"{M}/131016/residents/r-1/certificates", HIDDEN),
        (SAPPORO, "GET", f"{M}/131016/residents/r-1/fhir", HIDDEN),
        (CLINIC, "POST", f"{M}/131016/residents/r-1/certificates", role_refused("institution")),
        (ANONYMOUS, "GET", f"{M}/131016/residents/r-1/fhir", UNAUTHORIZED),
        # the disclosure log (情報提供等記録): own residents only, a stranger learns nothing
        (CHIYODA, "GET", f"{M}/131016/residents/r-1/disclosures", OK),
        (SAPPORO, "GET", f"{M}/131016/residents/r-1/disclosures", HIDDEN),
        (CLINIC, "GET", f"{M}/131016/residents/r-1/disclosures", role_refused("institution")),
        (NATIONAL, "GET", f"{M}/131016/residents/r-1/disclosures", role_refused("national")),
        # ...and the municipality's whole log: its own only
        (CHIYODA, "GET", f"{M}/131016/disclosures", OK),
        (SAPPORO, "GET", f"{M}/131016/disclosures", NOT_YOURS),
        (CLINIC, "GET", f"{M}/131016/disclosures", role_refused("institution")),
        (ANONYMOUS, "GET", f"{M}/131016/disclosures", UNAUTHORIZED),
        (ANONYMOUS, "POST", "/api/v1/certificates/verify", OK),
        (ANONYMOUS, "GET", "/issuer/.well-known/jwks.json", OK),
        (ANONYMOUS, "GET", "/issuer/.well-known/crl/abc.json", OK),
        # records
        (CLINIC, "POST", "/api/v1/doses", OK),
        (CHIYODA, "POST", "/api/v1/doses", OK),
        (SAPPORO, "POST", "/api/v1/doses/batch", OK),
        (NATIONAL, "POST", "/api/v1/doses", role_refused("national")),
        (ANONYMOUS, "POST", "/api/v1/doses/batch", UNAUTHORIZED),
        (CHIYODA, "GET", f"{M}/131016/doses", OK),
        (SAPPORO, "GET", f"{M}/131016/doses", NOT_YOURS),
        (CLINIC, "GET", f"{M}/131016/doses", role_refused("institution")),
        (CHIYODA, "POST", f"{M}/131016/doses/d-1/corrections", OK),
        (SAPPORO, "POST", f"{M}/131016/doses/d-1/corrections", NOT_YOURS),
        # stats: anyone; the service itself keeps municipality-level cuts for the national role
        (ANONYMOUS, "GET", "/api/v1/stats/doses", OK),
        (NATIONAL, "GET", "/api/v1/stats/doses", OK),
        (CHIYODA, "GET", "/api/v1/opendata/prefecture.ndjson", OK),
        (CLINIC, "GET", "/dashboard", OK),
        # the gateway's own audit trail: a municipality reads its own
        (CHIYODA, "GET", f"{M}/131016/audit", OK),
        (SAPPORO, "GET", f"{M}/131016/audit", NOT_YOURS),
        (NATIONAL, "GET", f"{M}/131016/audit", role_refused("national")),
        (ANONYMOUS, "GET", f"{M}/131016/audit", UNAUTHORIZED),
    ],
)
def test_authorize(principal: Principal, method: str, path: str, expected: tuple[type[VRSError], str] | None) -> None:
    match = TABLE.match(method, path)
    assert match is not None
    if expected is None:
        authorize(match, principal)
        return
    error_type, detail = expected
    with pytest.raises(error_type) as caught:
        authorize(match, principal)
    assert caught.value.detail == detail


def test_the_table_refuses_ambiguity() -> None:
    registry = Upstream.REGISTRY
    with pytest.raises(ValueError, match="twice"):
        PolicyTable([rule("GET", "/a/{x}", registry, None), rule("GET|POST", "/a/{x}", registry, None)])
    with pytest.raises(ValueError, match="another rule has"):
        PolicyTable([rule("GET", "/a/{x}", registry, None), rule("POST", "/a/{y}", registry, None)])
    with pytest.raises(ValueError, match="needs a"):
        rule("GET", "/a/{x}", registry, None, Scope.OWN_MUNICIPALITY)
    with pytest.raises(ValueError, match="starts with"):
        PolicyTable([rule("GET", "a", registry, None)])


def test_backtracks_from_a_literal_dead_end_to_a_parameter() -> None:
    table = PolicyTable([rule("GET", "/a/b/c", Upstream.STATS, None), rule("GET", "/a/{x}/d", Upstream.RECORDS, None)])
    match = table.match("GET", "/a/b/d")
    assert match is not None
    assert match.rule.path == "/a/{x}/d"
    assert match.params == {"x": "b"}


def test_body_limits_follow_the_method_and_the_path() -> None:
    assert {r.path for r in POLICY if r.body is Body.IMPORT} == {
        f"{M}/{{code}}/resident-imports",
        "/api/v1/dose-imports",
    }
    for r in POLICY:
        if r.methods <= {"GET"}:
            assert r.body is Body.NONE, r.path
    assert rule("POST", "/a/dose-imports", Upstream.RECORDS, None).body is Body.IMPORT
    assert rule("POST", "/a/doses", Upstream.RECORDS, None).body is Body.JSON
