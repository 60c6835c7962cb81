"""`vrs token` prints an identity token the development gateway accepts, and refuses claims it would not."""

from __future__ import annotations

import pytest

from services.gateway.settings import GatewaySettings
from shared.auth import Keyset, Role, TokenRules, principal_from_claims, verify_jwt
from shared.cli import main
from shared.dev_keys import DEV_IDENTITY_JWK, jwks_of


def test_token_for_a_municipality(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--role", "municipality", "--municipality", "131016"]) == 0
    settings = GatewaySettings()
    rules = TokenRules(
        issuer=settings.identity_issuer,
        audience=settings.identity_audience,
        max_lifetime_seconds=settings.token_max_lifetime_seconds,
        leeway_seconds=settings.clock_skew_seconds,
    )
    claims, kid = verify_jwt(capsys.readouterr().out.strip(), Keyset.from_jwks(jwks_of(DEV_IDENTITY_JWK)), rules)
    principal = principal_from_claims(claims)
    assert (principal.role, principal.municipality, kid) == (Role.MUNICIPALITY, "131016", DEV_IDENTITY_JWK["kid"])


@pytest.mark.parametrize(
    "argv",
    [
        ["token", "--role", "municipality", "--municipality", "131017"],  # wrong check digit
        ["token", "--role", "municipality"],
        ["token", "--role", "institution", "--institution", "123"],
    ],
)
def test_bad_claims_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "vrs token:" in capsys.readouterr().err
