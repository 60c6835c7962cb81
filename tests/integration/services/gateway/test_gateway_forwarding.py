"""The gateway in front of real HTTP upstreams: what it forwards, what it refuses, what it answers."""

from __future__ import annotations

import base64
import gzip
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.gateway.proxy import RawTransport
from services.gateway.settings import GatewaySettings
from shared.auth import InternalTokenVerifier, Role
from shared.db import Databases
from shared.dev_keys import DEV_IDENTITY_JWK
from shared.settings import AuthSettings
from tests.integration.services.gateway.gateway_fakes import CSV, KNOWN_RESIDENT, FakeUpstream, running_gateway

Token = Callable[..., dict[str, str]]
Settings = Callable[..., GatewaySettings]
CHIYODA, SAPPORO, CLINIC = "131016", "011002", "1312345678"
M = "/api/v1/municipalities"


def echoed(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    body["headers"] = dict(body["headers"])
    body["body"] = base64.b64decode(body["body"])
    return body


async def test_forwards_method_path_query_body_and_only_the_listed_headers(
    client: httpx.AsyncClient, token: Token
) -> None:
    # Odd spacing and key order: the body must arrive byte for byte, never re-encoded.
    body = b'{"coupon" : "1113101600000000001",  "dose_number":1, "note":"\xe6\x8e\xa5\xe7\xa8\xae"}'
    response = await client.post(
        "/api/v1/doses?dry_run=1&q=%E3%81%82&q=b",
        content=body,
        headers={
            **token(Role.INSTITUTION, institution=CLINIC),
            "Content-Type": "application/json; charset=utf-8",
            "Accept": "application/json",
            "Idempotency-Key": "dose-key-0001",
            "X-Access-Purpose": "consent",
            "X-Request-ID": "req-forward-1",
            "Cookie": "session=abc",
            "X-Forwarded-For": "10.1.2.3",
            "Accept-Encoding": "gzip",
            "X-Custom": "nope",
        },
    )
    assert response.status_code == 200
    seen = echoed(response)
    assert seen["upstream"] == "records"
    assert seen["method"] == "POST"
    assert seen["raw_path"] == "/api/v1/doses"
    assert seen["query"] == "dry_run=1&q=%E3%81%82&q=b"
    assert seen["body"] == body
    headers = seen["headers"]
    assert headers["idempotency-key"] == "dose-key-0001"
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["accept"] == "application/json"
    assert headers["x-access-purpose"] == "consent"
    assert headers["x-request-id"] == "req-forward-1"
    # The caller's token stays at the gateway: the upstream gets the gateway's internal token for the caller.
    internal = InternalTokenVerifier(AuthSettings()).principal(headers["authorization"])
    assert (internal.role, internal.institution) == (Role.INSTITUTION, CLINIC)
    # Nothing else of the caller's, and nothing the client library would add by default.
    assert set(headers) <= {
        "host",
        "content-length",
        "authorization",
        "content-type",
        "accept",
        "idempotency-key",
        "x-request-id",
        "x-access-purpose",
    }
    assert response.headers["x-request-id"] == "req-forward-1"


async def test_a_request_id_is_made_when_missing_and_returned(
    client: httpx.AsyncClient, upstreams: dict[str, FakeUpstream]
) -> None:
    response = await client.get("/api/v1/stats/doses?group_by=date")
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32
    assert echoed(response)["headers"]["x-request-id"] == request_id
    assert upstreams["stats"].seen[-1].header("x-request-id") == request_id


async def test_upstream_status_body_and_headers_come_back_unchanged(client: httpx.AsyncClient, token: Token) -> None:
    response = await client.post(
        "/api/v1/doses/batch?fake_status=409",
        content=b"{}",
        headers=token(Role.MUNICIPALITY, municipality=CHIYODA),
    )
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-upstream"] == "records"
    assert echoed(response)["upstream"] == "records"

    csv = await client.get("/api/v1/opendata/summary_by_date.csv")
    assert csv.status_code == 200
    assert csv.headers["content-type"] == "text/csv; charset=utf-8"
    assert csv.content == CSV
    assert int(csv.headers["content-length"]) == len(CSV)


async def test_a_compressed_body_is_passed_through_not_decoded(client: httpx.AsyncClient) -> None:
    async with client.stream("GET", "/api/v1/stats/doses?fake_gzip=1") as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw) == b'{"rows":[]}'


async def test_a_chunked_answer_arrives_whole_with_its_length(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/stats/doses?fake_stream=500")
    assert response.status_code == 200
    assert response.content == b"".join(f'{{"n":{n}}}\n'.encode() for n in range(500))
    assert response.headers["content-length"] == str(len(response.content))
    assert "transfer-encoding" not in response.headers


async def test_upstream_cookies_are_not_replayed_to_the_next_caller(
    client: httpx.AsyncClient, upstreams: dict[str, FakeUpstream]
) -> None:
    first = await client.get("/dashboard")
    assert first.headers["set-cookie"].startswith("sticky=stats")
    client.cookies.clear()
    await client.get("/dashboard")
    assert upstreams["stats"].seen[-1].header("cookie") is None


async def test_idempotency_key_reaches_the_upstream_on_every_retry(
    client: httpx.AsyncClient, token: Token, upstreams: dict[str, FakeUpstream]
) -> None:
    headers = {**token(Role.INSTITUTION, institution=CLINIC), "Idempotency-Key": "same-key"}
    for _ in range(2):
        response = await client.post("/api/v1/doses", json={"dose_number": 1}, headers=headers)
        assert response.status_code == 200
        assert upstreams["records"].seen[-1].header("idempotency-key") == "same-key"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/internal/v1/coupon-lookups"),
        ("GET", "/internal/v1/municipalities/131016/doses"),
        ("GET", "/api/v1/nothing-here"),
        ("GET", "/api/v1/doses"),
        ("DELETE", f"{M}/{CHIYODA}/residents/r-1"),
        ("GET", f"{M}/{CHIYODA}/residents/r-1/"),
        ("GET", f"{M}/{CHIYODA}/residents/..%2F..%2F..%2F..%2Finternal%2Fv1%2Fcoupon-lookups"),
        ("GET", f"{M}/{CHIYODA}/residents/r%2F1"),
    ],
)
async def test_unknown_and_internal_paths_are_404_and_never_forwarded(
    client: httpx.AsyncClient, token: Token, upstreams: dict[str, FakeUpstream], method: str, path: str
) -> None:
    before = {name: len(u.seen) for name, u in upstreams.items()}
    for headers in ({}, token(Role.NATIONAL), token(Role.MUNICIPALITY, municipality=CHIYODA)):
        response = await client.request(method, path, headers=headers)
        assert response.status_code == 404
        assert response.json() == {"error": "NotFound", "detail": "no such endpoint"}
    assert {name: len(u.seen) for name, u in upstreams.items()} == before


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer not.a.token",
        "Basic dXNlcjpwYXNz",
        "Bearer",
    ],
)
async def test_missing_or_invalid_token_is_401(
    client: httpx.AsyncClient, upstreams: dict[str, FakeUpstream], authorization: str | None
) -> None:
    before = len(upstreams["records"].seen)
    headers = {"Authorization": authorization} if authorization else {}
    response = await client.post("/api/v1/doses", json={}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == "Unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert len(upstreams["records"].seen) == before


@pytest.mark.parametrize(
    ("claims", "method", "path"),
    [
        ({"role": Role.NATIONAL}, "GET", f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}"),
        ({"role": Role.INSTITUTION, "institution": CLINIC}, "GET", f"{M}/{CHIYODA}/doses"),
        ({"role": Role.NATIONAL}, "POST", "/api/v1/doses"),
        ({"role": Role.MUNICIPALITY, "municipality": SAPPORO}, "PUT", f"{M}/{CHIYODA}/residents/r-1"),
        ({"role": Role.MUNICIPALITY, "municipality": SAPPORO}, "GET", f"{M}/{CHIYODA}/doses"),
        ({"role": Role.MUNICIPALITY, "municipality": SAPPORO}, "POST", f"{M}/{CHIYODA}/resident-imports"),
    ],
)
async def test_wrong_role_or_other_municipality_is_403_and_not_forwarded(
    client: httpx.AsyncClient,
    token: Token,
    upstreams: dict[str, FakeUpstream],
    claims: dict[str, Any],
    method: str,
    path: str,
) -> None:
    before = {name: len(u.seen) for name, u in upstreams.items()}
    response = await client.request(method, path, headers=token(**claims), json={})
    assert response.status_code == 403
    assert response.json()["error"] == "Forbidden"
    assert {name: len(u.seen) for name, u in upstreams.items()} == before


@pytest.mark.parametrize(
    ("method", "path", "json_body"),
    [
        ("GET", f"/residents/{KNOWN_RESIDENT}", None),
        ("POST", "/transfer-lookups", {"my_number": "123456789018", "legal_basis": "consent"}),
    ],
)
async def test_another_municipalitys_resident_looks_exactly_like_an_unknown_one(
    client: httpx.AsyncClient, token: Token, method: str, path: str, json_body: Any
) -> None:
    stranger = await client.request(
        method, f"{M}/{CHIYODA}{path}", json=json_body, headers=token(Role.MUNICIPALITY, municipality=SAPPORO)
    )
    unknown_path = path.replace(KNOWN_RESIDENT, "r-nobody")
    owner_unknown = await client.request(
        method, f"{M}/{CHIYODA}{unknown_path}", json=json_body, headers=token(Role.MUNICIPALITY, municipality=CHIYODA)
    )
    assert owner_unknown.status_code == stranger.status_code == 404
    assert stranger.content == owner_unknown.content == b'{"error":"NotFound","detail":"resident not found"}'
    ignored = {"x-request-id"}
    assert {k: v for k, v in stranger.headers.items() if k not in ignored} == {
        k: v for k, v in owner_unknown.headers.items() if k not in ignored
    }


async def test_the_owner_reads_its_resident(client: httpx.AsyncClient, token: Token) -> None:
    response = await client.get(
        f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=token(Role.MUNICIPALITY, municipality=CHIYODA)
    )
    assert response.status_code == 200
    assert echoed(response)["upstream"] == "registry"


async def test_public_statistics_need_no_token(client: httpx.AsyncClient) -> None:
    for path, upstream in (("/api/v1/stats/doses", "stats"), ("/dashboard", "stats")):
        response = await client.get(path)
        assert response.status_code == 200
        assert echoed(response)["upstream"] == upstream
        # Even an anonymous caller reaches a service only with the gateway's word for it.
        forwarded = echoed(response)["headers"]["authorization"]
        assert InternalTokenVerifier(AuthSettings()).principal(forwarded).role is Role.ANONYMOUS


async def test_a_body_over_the_limit_is_413(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    settings = gateway_settings(records_url=upstreams["records"].url, max_json_body_bytes=1000)
    async with running_gateway(settings) as (_, client):
        headers = token(Role.INSTITUTION, institution=CLINIC)
        assert (await client.post("/api/v1/doses", content=b"x" * 1000, headers=headers)).status_code == 200
        response = await client.post("/api/v1/doses", content=b"x" * 1001, headers=headers)
        assert response.status_code == 413
        assert response.json()["error"] == "PayloadTooLarge"


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_502_with_a_generic_body_when_the_upstream_is_down(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], dead_url: str, token: Token, transport: str
) -> None:
    settings = gateway_settings(
        registry_url=upstreams["registry"].url,
        records_url=dead_url,
        stats_url=upstreams["stats"].url,
        proxy_transport=transport,
    )
    async with running_gateway(settings) as (_, client):
        response = await client.post("/api/v1/doses", json={}, headers=token(Role.INSTITUTION, institution=CLINIC))
        assert response.status_code == 502
        assert response.json() == {
            "error": "BadGateway",
            "detail": "the service behind this path is unavailable; retry",
        }
        assert dead_url.rsplit(":", 1)[1] not in response.text
        assert "x-request-id" in response.headers
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["detail"] == "records: UpstreamUnreachable"  # which one, never its address


async def test_readiness_names_the_failing_dependency_but_not_its_message(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], tmp_path: Any
) -> None:
    settings = gateway_settings(stats_url=upstreams["stats"].url)
    async with running_gateway(settings) as (app, client):
        await app.state.databases.dispose()
        (tmp_path / "gone").mkdir()
        app.state.databases = Databases.connect(f"sqlite+aiosqlite:///{tmp_path / 'gone' / 'x' / 'y.db'}")
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"error": "NotReady", "detail": "OperationalError"}


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_504_when_the_upstream_is_too_slow(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token, transport: str
) -> None:
    settings = gateway_settings(
        stats_url=upstreams["stats"].url,
        proxy_transport=transport,
        proxy_timeout_seconds=0.2,
    )
    async with running_gateway(settings) as (_, client):
        response = await client.get("/dashboard?fake_sleep=0.6")
        assert response.status_code == 504
        assert response.json() == {
            "error": "GatewayTimeout",
            "detail": "the service behind this path did not answer in time",
        }


async def test_ready_when_the_database_and_every_upstream_answer(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text


async def test_health_and_metrics_are_the_gateways_own(
    gateway: tuple[FastAPI, httpx.AsyncClient], upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    _, client = gateway
    before = {name: len(u.seen) for name, u in upstreams.items()}
    assert (await client.get("/healthz")).json() == {"status": "ok", "service": "gateway"}
    await client.get(
        f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=token(Role.MUNICIPALITY, municipality=CHIYODA)
    )
    metrics = (await client.get("/metrics")).text
    # Labelled by the rule's template: a resident id never becomes a label value.
    assert 'route="/api/v1/municipalities/{code}/residents/{resident_id}",service="gateway"' in metrics
    assert KNOWN_RESIDENT not in metrics
    assert sum(len(u.seen) for u in upstreams.values()) == sum(before.values()) + 1


async def test_header_values_pass_as_utf8_bytes_and_other_bytes_are_400(
    client: httpx.AsyncClient, upstreams: dict[str, FakeUpstream]
) -> None:
    purpose = "接種記録の確認"
    response = await client.get("/dashboard", headers={b"X-Access-Purpose": purpose.encode()})
    assert response.status_code == 200
    assert upstreams["stats"].seen[-1].header("x-access-purpose") == purpose.encode().decode("latin-1")
    before = len(upstreams["stats"].seen)
    bad = await client.get("/dashboard", headers={b"X-Access-Purpose": b"\xff\xfe"})
    assert bad.status_code == 400
    assert bad.json() == {"error": "BadRequest", "detail": "header x-access-purpose is not UTF-8"}
    assert len(bad.headers["x-request-id"]) == 32
    assert len(upstreams["stats"].seen) == before


async def test_the_identity_keys_are_published(client: httpx.AsyncClient) -> None:
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.json() == {"keys": [DEV_IDENTITY_JWK]}
    assert "d" not in response.json()["keys"][0]  # public halves only


async def test_the_raw_transport_ends_an_answer_to_head_at_its_headers(upstreams: dict[str, FakeUpstream]) -> None:
    transport = RawTransport(pool_size=2, connect_timeout=1.0, timeout=2.0, keepalive=4.0)
    try:
        head = await transport.send("HEAD", upstreams["stats"].url + "/healthz", {}, b"")
        get = await transport.send("GET", upstreams["stats"].url + "/healthz", {}, b"")
    finally:
        await transport.close()
    assert head.body == b"" and int(dict(head.headers)[b"content-length"]) > 0
    assert get.status == 200 and b'"ok"' in get.body
