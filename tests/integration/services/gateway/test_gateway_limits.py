"""What the gateway refuses before a service sees it: floods, bodies where none belong, oversized and deep bodies."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from services.gateway.settings import GatewaySettings
from shared.auth import Role
from tests.integration.services.gateway.gateway_fakes import FakeUpstream, running_gateway

Token = Callable[..., dict[str, str]]
Settings = Callable[..., GatewaySettings]
CHIYODA, CLINIC = "131016", "1312345678"
M = "/api/v1/municipalities"


async def test_anonymous_callers_are_limited_per_address(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream]
) -> None:
    settings = gateway_settings(stats_url=upstreams["stats"].url, rate_per_address=0.5, burst_per_address=2)
    async with running_gateway(settings) as (app, _):
        first = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.0.0.1", 1)), base_url="http://g")
        other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.0.0.2", 1)), base_url="http://g")
        async with first, other:
            statuses = [(await first.get("/api/v1/stats/doses")).status_code for _ in range(3)]
            assert statuses == [200, 200, 429]
            refused = await first.get("/api/v1/stats/doses")
            assert refused.json() == {
                "error": "TooManyRequests",
                "detail": "too many requests; retry later",
                "retry_after": 2,
            }
            assert refused.headers["retry-after"] == "2"
            assert (await other.get("/api/v1/stats/doses")).status_code == 200  # another address has its own bucket


def forged(token: Token) -> dict[str, str]:
    """A national caller's signature under a municipality's claims."""
    header, _, signature = token(Role.NATIONAL)["Authorization"].split(".")
    claims = token(Role.MUNICIPALITY, municipality=CHIYODA)["Authorization"].split(".")[1]
    return {"Authorization": f"{header}.{claims}.{signature}"}


BAD_TOKENS: dict[str, Callable[[Token], dict[str, str]]] = {
    "forged": forged,
    "malformed": lambda _: {"Authorization": "Bearer a.b.c"},
    "not a bearer token": lambda _: {"Authorization": "Basic dXNlcjpwYXNz"},
}


@pytest.mark.parametrize("bad", list(BAD_TOKENS))
async def test_callers_whose_token_fails_verification_are_limited_per_address(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token, bad: str
) -> None:
    settings = gateway_settings(stats_url=upstreams["stats"].url, rate_per_address=0.5, burst_per_address=2)
    refused_token = BAD_TOKENS[bad](token)
    async with running_gateway(settings) as (app, _):
        first = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.0.0.1", 1)), base_url="http://g")
        other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.0.0.2", 1)), base_url="http://g")
        async with first, other:
            statuses = [(await first.get("/api/v1/stats/doses", headers=refused_token)).status_code for _ in range(3)]
            assert statuses == [401, 401, 429]
            assert (await first.get("/api/v1/stats/doses", headers=refused_token)).headers["retry-after"] == "2"
            # The address's own bucket: a caller there without a token waits too; a valid token has its own
            # bucket, and another address is not held up.
            assert (await first.get("/api/v1/stats/doses")).status_code == 429
            assert (await first.get("/api/v1/stats/doses", headers=token(Role.NATIONAL))).status_code == 200
            assert (await other.get("/api/v1/stats/doses", headers=refused_token)).status_code == 401


async def test_callers_with_a_token_are_limited_per_principal(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    settings = gateway_settings(stats_url=upstreams["stats"].url, rate_per_principal=1, burst_per_principal=2)
    async with running_gateway(settings) as (_, client):
        national = token(Role.NATIONAL)
        statuses = [(await client.get("/api/v1/stats/doses", headers=national)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        # A new token of the same organisation shares its bucket; another organisation does not.
        assert (await client.get("/api/v1/stats/doses", headers=token(Role.NATIONAL))).status_code == 429
        clinic = token(Role.INSTITUTION, institution=CLINIC)
        assert (await client.get("/api/v1/stats/doses", headers=clinic)).status_code == 200


async def test_a_get_with_a_body_is_refused_and_not_forwarded(
    client: httpx.AsyncClient, upstreams: dict[str, FakeUpstream]
) -> None:
    before = len(upstreams["stats"].seen)
    response = await client.request("GET", "/api/v1/stats/doses", content=b"x" * 10)
    assert response.status_code == 400
    assert response.json() == {"error": "BadRequest", "detail": "this request takes no body"}
    assert len(upstreams["stats"].seen) == before


async def test_body_limits_are_per_route(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    settings = gateway_settings(
        registry_url=upstreams["registry"].url,
        records_url=upstreams["records"].url,
        max_json_body_bytes=1000,
        max_import_body_bytes=5000,
    )
    async with running_gateway(settings) as (_, client):
        clinic = token(Role.INSTITUTION, institution=CLINIC)
        assert (await client.post("/api/v1/doses", content=b"x" * 1000, headers=clinic)).status_code == 200
        too_big = await client.post("/api/v1/doses", content=b"x" * 1001, headers=clinic)
        assert too_big.status_code == 413
        assert too_big.json() == {"error": "PayloadTooLarge", "detail": "the body is larger than 1000 bytes"}
        chiyoda = token(Role.MUNICIPALITY, municipality=CHIYODA)
        csv = b"resident_id,name\r\n" + b"r,x\r\n" * 900
        assert len(csv) > 1000
        imported = await client.post(f"{M}/{CHIYODA}/resident-imports", content=csv, headers=chiyoda)
        assert imported.status_code == 200
        huge = await client.post(f"{M}/{CHIYODA}/resident-imports", content=csv * 2, headers=chiyoda)
        assert huge.status_code == 413


@pytest.mark.parametrize("nesting", ["[" * 100_000, '{"a":' * 50_000, '{"legal_basis":"consent","x":' + "[" * 5000])
async def test_a_deeply_nested_body_is_refused_before_anything_acts(
    client: httpx.AsyncClient, upstreams: dict[str, FakeUpstream], token: Token, nesting: str
) -> None:
    before = len(upstreams["registry"].seen)
    response = await client.post(
        f"{M}/{CHIYODA}/transfer-lookups",
        content=nesting.encode(),
        headers={**token(Role.MUNICIPALITY, municipality=CHIYODA), "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json() == {"error": "BadRequest", "detail": "the JSON body is nested deeper than 32 levels"}
    assert len(upstreams["registry"].seen) == before


async def test_deep_nesting_inside_strings_is_just_text(
    client: httpx.AsyncClient, upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    body = '{"legal_basis":"consent","my_number":"' + "[" * 1000 + '"}'
    response = await client.post(
        f"{M}/{CHIYODA}/transfer-lookups",
        content=body.encode(),
        headers={**token(Role.MUNICIPALITY, municipality=CHIYODA), "Content-Type": "application/json"},
    )
    assert response.status_code == 404  # forwarded: the fake registry knows nobody
    assert upstreams["registry"].seen[-1].body == body.encode()


@pytest.mark.parametrize(
    "authorization",
    ["Bearer eyJhbGciOiJFUzI1NiJ9.e30.AAAA", "Bearer a.b.c", "Bearer " + "A" * 5000, "Bearer x.eyJ.y"],
)
async def test_token_errors_never_carry_a_library_message(client: httpx.AsyncClient, authorization: str) -> None:
    response = await client.get("/api/v1/stats/doses", headers={"Authorization": authorization})
    assert response.status_code == 401
    detail = response.json()["detail"]
    assert detail.startswith("invalid token: ")
    for leak in ("jose", "Signature", "Error", "Traceback", "decode", "padding"):
        assert leak not in detail
