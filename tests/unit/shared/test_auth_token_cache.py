"""The verified-token cache: a hit skips verification, and never outlives the token or its TTL."""

from __future__ import annotations

import time

import pytest

import shared.auth as auth_module
from shared.auth import ANONYMOUS, Role, TokenVerifier, mint_token, principal_from_header
from shared.errors import Unauthorized
from shared.settings import AuthSettings

AUTH = AuthSettings()


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def counting(settings: AuthSettings, authorization: str | None) -> object:
        calls.append(authorization or "")
        return principal_from_header(settings, authorization)

    monkeypatch.setattr(auth_module, "principal_from_header", counting)
    return calls


def bearer(**claims: object) -> str:
    return "Bearer " + mint_token(AUTH, **claims)  # type: ignore[arg-type]


def test_a_token_is_verified_once_while_cached(verifications: list[str]) -> None:
    verifier = TokenVerifier(AUTH, cache_size=10, ttl_seconds=60)
    header = bearer(role=Role.MUNICIPALITY, municipality="131016")
    first = verifier.principal(header)
    assert verifier.principal(header) is first
    assert first.municipality == "131016"
    assert len(verifications) == 1


def test_no_header_is_anonymous_and_bad_tokens_are_never_cached(verifications: list[str]) -> None:
    verifier = TokenVerifier(AUTH, cache_size=10, ttl_seconds=60)
    assert verifier.principal(None) is ANONYMOUS
    for header in (
        "Bearer not-a-token",
        "Basic abc",
        "Bearer " + mint_token(AuthSettings(jwt_secret="x" * 40), role=Role.NATIONAL),
    ):
        for _ in range(2):
            with pytest.raises(Unauthorized):
                verifier.principal(header)
    assert len(verifier) == 0
    assert len(verifications) == 6


def test_an_entry_expires_with_its_token(verifications: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TokenVerifier(AUTH, cache_size=10, ttl_seconds=3600)
    header = bearer(role=Role.NATIONAL, ttl_seconds=30)
    verifier.principal(header)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 31)
    # Past exp: verified again (python-jose keeps its own clock, so only the re-verification shows here).
    verifier.principal(header)
    assert len(verifications) == 2


def test_an_entry_is_verified_again_after_the_ttl(verifications: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TokenVerifier(AUTH, cache_size=10, ttl_seconds=5)
    header = bearer(role=Role.NATIONAL)
    verifier.principal(header)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 6)
    verifier.principal(header)
    assert len(verifications) == 2


def test_the_cache_is_bounded_least_recently_used_first(verifications: list[str]) -> None:
    verifier = TokenVerifier(AUTH, cache_size=2, ttl_seconds=60)
    a, b, c = (bearer(role=Role.NATIONAL, subject=s) for s in "abc")
    verifier.principal(a)
    verifier.principal(b)
    verifier.principal(a)  # a is now the most recent
    verifier.principal(c)  # evicts b
    assert len(verifier) == 2
    verifier.principal(a)
    assert len(verifications) == 3
    verifier.principal(b)
    assert len(verifications) == 4


def test_size_zero_turns_the_cache_off(verifications: list[str]) -> None:
    verifier = TokenVerifier(AUTH, cache_size=0, ttl_seconds=60)
    header = bearer(role=Role.NATIONAL)
    verifier.principal(header)
    verifier.principal(header)
    assert len(verifications) == 2
    assert len(verifier) == 0
