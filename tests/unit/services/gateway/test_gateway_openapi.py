"""The gateway's OpenAPI document: the services' own schemas, cut to what the policy table routes."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from services.gateway.app import create_app
from services.gateway.openapi import build_openapi
from services.gateway.policy import TABLE, Upstream
from services.gateway.settings import GatewaySettings
from shared.observability import JsonFormatter

DOC = build_openapi(TABLE)


def operations() -> list[tuple[str, str]]:
    return [(m.upper(), p) for p, item in DOC["paths"].items() for m in item]


def test_every_documented_operation_is_routed_by_the_policy_and_nothing_internal_shows() -> None:
    for method, path in operations():
        if path == "/.well-known/jwks.json":  # the gateway's own, outside the policy
            continue
        assert TABLE.match(method, path.replace("{code}", "131016")) is not None, (method, path)
        assert not path.startswith("/internal")
    assert ("GET", "/.well-known/jwks.json") in operations()
    assert ("GET", "/api/v1/municipalities/{code}/audit") in operations()


def test_every_contract_route_a_service_serves_is_documented_from_its_own_schema() -> None:
    for upstream in (Upstream.REGISTRY, Upstream.RECORDS, Upstream.STATS):
        router = importlib.import_module(f"services.{upstream.value}.router").router
        for route in router.routes:
            assert isinstance(route, APIRoute)
            if not route.include_in_schema:  # e.g. the dashboard's script files
                continue
            for method in route.methods or ():
                match = TABLE.match(method, route.path)
                if match is None or match.rule.upstream is not upstream:
                    continue
                op = DOC["paths"][route.path][method.lower()]
                assert op["operationId"] == route.unique_id, (method, route.path)


def test_operations_carry_the_gateways_security_and_errors() -> None:
    resident = DOC["paths"]["/api/v1/municipalities/{code}/residents/{resident_id}"]["get"]
    assert resident["security"] == [{"bearer": []}]
    assert {"401", "403", "404", "429", "502", "504"} <= set(resident["responses"])
    assert "413" not in resident["responses"]  # a GET takes no body
    stats = DOC["paths"]["/api/v1/stats/doses"]["get"]
    assert stats["security"] == [{}, {"bearer": []}]  # anyone, token optional
    dose = DOC["paths"]["/api/v1/doses"]["post"]
    assert dose["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ValidationErrorBody"
    }
    assert "HTTPValidationError" not in str(DOC["paths"])


@pytest.mark.parametrize(
    ("path", "method", "header"),
    [
        ("/api/v1/municipalities/{code}/residents/{resident_id}", "get", True),
        ("/api/v1/municipalities/{code}/residents/{resident_id}/disclosures", "get", True),
        ("/api/v1/municipalities/{code}/disclosures", "get", True),
        # A transfer lookup states its legal basis in the body: the gateway names it to registry itself.
        ("/api/v1/municipalities/{code}/transfer-lookups", "post", False),
        ("/api/v1/municipalities/{code}/transfer-lookups/batch", "post", False),
    ],
)
def test_x_access_purpose_is_documented_where_a_caller_states_a_basis_with_it(
    path: str, method: str, header: bool
) -> None:
    names = [p["name"] for p in DOC["paths"][path][method].get("parameters", [])]
    assert ("X-Access-Purpose" in names) is header


def test_building_the_contract_leaves_the_gateways_own_log_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The services' apps are built in the gateway's process; their labels must not end up on its log lines.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a fresh process
    create_app(GatewaySettings(main_dsn=f"sqlite+aiosqlite:///{tmp_path / 'g.db'}", audit_anchor_dir=tmp_path))
    formatter = logging.getLogger().handlers[0].formatter
    assert isinstance(formatter, JsonFormatter) and formatter.service == "gateway"
