"""The external contract as one OpenAPI document, built from the services' own FastAPI schemas.

At start the gateway builds each service's app in-process (never started: no database, no network), takes its
``app.openapi()``, keeps the operations the policy table routes to that service, and merges them with the
gateway's own paths (the audit trail, the JWKS). Each operation gets the security and the errors the gateway
adds in front of it (401/403 from the policy, 413/400 for bodies, 429, 502, 504), so the document is what a
caller actually meets — and nothing is written twice.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterable
from typing import Any

from services.gateway.policy import Body, PolicyTable, Rule, Upstream
from shared.errors import FieldError, ValidationErrorBody

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_ERROR_BODY = {
    "title": "ErrorBody",
    "type": "object",
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    "required": ["error", "detail"],
}
_GATEWAY_ERRORS = {
    "400": "BadRequest: a body where none belongs, a JSON body nested too deep, a header that is not UTF-8",
    "413": "PayloadTooLarge: the body is over this route's limit",
    "429": "TooManyRequests: the caller's rate limit; see Retry-After",
    "502": "BadGateway: the service behind this path is unavailable",
    "503": "ServiceUnavailable: the audit trail or the token keys are unavailable",
    "504": "GatewayTimeout: the service behind this path did not answer in time",
}
_METHODS = ("get", "put", "post", "delete", "patch")


def _service_schema(name: str) -> dict[str, Any]:
    """``app.openapi()`` of service ``name``, its app built but never started."""
    spec = importlib.import_module("shared.migrations").BY_NAME[name]
    settings_class = getattr(importlib.import_module(f"services.{name}.settings"), spec.settings_class)
    # Not validated: the gateway does not hold the service's secrets, and nothing here connects anywhere.
    settings = settings_class.model_construct(main_dsn="sqlite+aiosqlite://", shard_dsns={})
    app = importlib.import_module(f"services.{name}.app").create_app(settings)
    schema: dict[str, Any] = app.openapi()
    return schema


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


_VALIDATION_REF = {"$ref": "#/components/schemas/ValidationErrorBody"}


def _decorate(operation: dict[str, Any], rule: Rule) -> dict[str, Any]:
    op = copy.deepcopy(operation)
    responses: dict[str, Any] = op.setdefault("responses", {})
    # FastAPI documents its own 422 shape; every service answers with shared.errors' one instead.
    unprocessable = responses.get("422", {}).get("content", {}).get("application/json", {})
    if unprocessable.get("schema") == {"$ref": "#/components/schemas/HTTPValidationError"}:
        unprocessable["schema"] = _VALIDATION_REF
    if rule.roles is None:
        op["security"] = [{}, {"bearer": []}]
    else:
        op["security"] = [{"bearer": []}]
        responses.setdefault("401", _error("Unauthorized: no valid bearer token"))
        responses.setdefault("403", _error("Forbidden: the role or the municipality is not the caller's"))
    if rule.scope.value == "own-hidden":
        responses.setdefault("404", _error("NotFound: unknown, or another municipality's"))
    if rule.reads_personal_data:
        responses.setdefault(
            "422",
            {
                "description": "InvalidField: X-Access-Purpose is not a known legal basis",
                "content": {"application/json": {"schema": _VALIDATION_REF}},
            },
        )
    for status, description in _GATEWAY_ERRORS.items():
        if status == "413" and rule.body is Body.NONE:
            continue
        responses.setdefault(status, _error(description))
    if rule.purpose_field is not None:
        # A transfer lookup states its legal basis in the body, and the gateway names it to registry itself: the
        # header registry reads is not the caller's to send.
        op["parameters"] = [p for p in op.get("parameters", []) if p["name"] != "X-Access-Purpose"]
    elif rule.reads_personal_data:
        op.setdefault("parameters", []).append(
            {
                "name": "X-Access-Purpose",
                "in": "header",
                "required": False,
                "description": "legal basis of this access (audited): administration (default), consent, "
                "my-number-act-19-16",
                "schema": {"type": "string", "enum": ["administration", "consent", "my-number-act-19-16"]},
            }
        )
    return op


def _merge_components(into: dict[str, Any], schemas: dict[str, Any], service: str) -> None:
    for name, schema in schemas.items():
        if name in into and into[name] != schema:
            raise ValueError(f"schema {name} of {service} differs from another service's: rename one")
        into[name] = schema


_AUDIT_ENTRY = {
    "type": "object",
    "properties": {
        name: {"type": kind} if not nullable else {"anyOf": [{"type": kind}, {"type": "null"}]}
        for name, kind, nullable in (
            ("instance", "string", False),
            ("seq", "integer", False),
            ("recorded_at", "string", False),
            ("request_id", "string", False),
            ("principal", "string", False),
            ("role", "string", False),
            ("caller_municipality", "string", True),
            ("institution", "string", True),
            ("municipality", "string", True),
            ("action", "string", False),
            ("resource", "string", False),
            ("legal_basis", "string", False),
            # null in an intent (written before the request was forwarded); its outcome entry names it.
            ("outcome", "integer", True),
            ("intent_seq", "integer", True),
        )
    },
}


def _gateway_paths() -> dict[str, Any]:
    date_param = {
        "type": "string",
        "description": "YYYY-MM-DD (a whole Japanese day) or an ISO 8601 date-time (without a zone: Japan's)",
    }
    return {
        "/api/v1/municipalities/{code}/audit": {
            "get": {
                "tags": ["audit"],
                "summary": "This municipality's audit entries: accesses to its data and those it made",
                "parameters": [
                    {
                        "name": "code",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": r"^\d{6}$"},
                    },
                    {"name": "from", "in": "query", "required": False, "schema": date_param},
                    {"name": "to", "in": "query", "required": False, "schema": date_param},
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "description": "the previous page's next: <instance>:<seq>"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1000},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "oldest first, a page of at most limit entries; truncated tells whether more "
                        "follow, and next is the after that reads them",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "entries": {"type": "array", "items": _AUDIT_ENTRY},
                                        "truncated": {"type": "boolean"},
                                        "next": {"type": ["string", "null"]},
                                        "kept_from": {
                                            "type": "string",
                                            "format": "date-time",
                                            "description": "the trail keeps entries from this moment on "
                                            "(VRS_GATEWAY_AUDIT_KEEP_YEARS, seven years at least): older ones are "
                                            "deleted",
                                        },
                                    },
                                    "required": ["entries", "truncated", "next", "kept_from"],
                                }
                            }
                        },
                    },
                    "422": _error("InvalidField: from, to, after or limit"),
                },
            }
        },
        "/.well-known/jwks.json": {
            "get": {
                "tags": ["auth"],
                "summary": "The identity keys the gateway verifies callers' tokens with",
                "security": [{}],
                "responses": {
                    "200": {
                        "description": "a JWKS",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def build_openapi(table: PolicyTable, *, services: Iterable[Upstream] | None = None) -> dict[str, Any]:
    wanted = list(services or (u for u in Upstream if u is not Upstream.GATEWAY))
    rules = {(method.lower(), r.path): r for r in table.rules for method in r.methods}

    def rule_for(method: str, path: str) -> Rule | None:
        # By matching, not by spelling: a service may serve literal paths under one templated rule.
        match = table.match(method.upper(), path)
        return match.rule if match is not None else None

    paths: dict[str, Any] = {}
    components: dict[str, Any] = {}
    for upstream in wanted:
        schema = _service_schema(upstream.value)
        for path, item in schema.get("paths", {}).items():
            for method in _METHODS:
                rule = rule_for(method, path)
                if method in item and rule is not None and rule.upstream is upstream:
                    paths.setdefault(path, {})[method] = _decorate(item[method], rule)
        _merge_components(components, schema.get("components", {}).get("schemas", {}), upstream.value)
    components.setdefault("ErrorBody", _ERROR_BODY)
    for name, model in (("ValidationErrorBody", ValidationErrorBody), ("FieldError", FieldError)):
        if name not in components:
            components[name] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components[name].pop("$defs", None)
    for path, item in _gateway_paths().items():
        for method, operation in item.items():
            rule = rules.get((method, path))
            paths.setdefault(path, {})[method] = _decorate(operation, rule) if rule else operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "VRS — Vaccination Record System",
            "version": "1",
            "description": "The external contract, through the gateway. Generated from the services' own schemas.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT (ES256 or RS256, with kid; iss, aud, exp, iat required)",
                }
            },
        },
    }
