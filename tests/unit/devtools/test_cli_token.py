"""`vrs token` prints a token the services accept, and refuses claims they would not."""

from __future__ import annotations

import pytest

from shared.auth import Role, verify_token
from shared.cli import main
from shared.settings import AuthSettings


def test_token_for_a_municipality(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--role", "municipality", "--municipality", "131016"]) == 0
    principal = verify_token(AuthSettings(), capsys.readouterr().out.strip())
    assert (principal.role, principal.municipality) == (Role.MUNICIPALITY, "131016")


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
