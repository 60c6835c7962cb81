"""The gateway's OpenAPI document against the running system (embedded stack): for every documented route,
with a valid token of a role the policy lets in, generated requests never get a 5xx and every answer matches
the document (status, content type, body schema)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from devtools.launcher import Stack
from devtools.tokens import bearer_headers
from services.gateway.openapi import build_openapi
from services.gateway.policy import TABLE
from shared.auth import Role

CHIYODA, CLINIC = "131016", "1312345678"
SCHEMA = schemathesis.openapi.from_dict(build_openapi(TABLE))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def caller(method: str, path: str) -> dict[str, str]:
    """A valid token of a role the policy lets call this route (a municipality on its own code first)."""
    match = TABLE.match(method, path.replace("{code}", CHIYODA))
    roles = match.rule.roles if match is not None else None
    if roles is None or Role.NATIONAL in roles:
        return bearer_headers(Role.NATIONAL)
    if Role.MUNICIPALITY in roles:
        return bearer_headers(Role.MUNICIPALITY, municipality=CHIYODA)
    return bearer_headers(Role.INSTITUTION, institution=CLINIC)


@pytest.fixture(scope="module")
def gateway_url(embedded_stack: Stack) -> str:
    return embedded_stack.url()


def test_the_served_document_is_the_generated_one(gateway_url: str) -> None:
    served = httpx.get(gateway_url + "/openapi.json").json()
    assert served == build_openapi(TABLE)
    assert httpx.get(gateway_url + "/docs").status_code == 200


@SCHEMA.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_answers_within_its_contract(case: Any, gateway_url: str) -> None:
    if "code" in (case.path_parameters or {}):
        case.path_parameters["code"] = CHIYODA
    case.call_and_validate(
        base_url=gateway_url, headers=caller(case.method, case.operation.path), checks=CHECKS, timeout=30
    )
