"""The verified-token cache: a hit skips verification, and never outlives the token, its TTL or its key."""

from __future__ import annotations

import time

import pytest

import shared.auth as auth_module
from shared.auth import ANONYMOUS, InternalTokenVerifier, Principal, Role, TokenCache
from shared.errors import Unauthorized
from shared.settings import AuthSettings
from tests.factories import internal_headers, internal_token

AUTH = AuthSettings()
CHIYODA = Principal(role=Role.MUNICIPALITY, subject="131016", municipality="131016")


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = auth_module.verify_jwt

    def counting(token: str, *args: object, **kwargs: object) -> object:
        calls.append(token)
        return real(token, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(auth_module, "verify_jwt", counting)
    return calls


def bearer(role: Role = Role.NATIONAL, **claims: object) -> str:
    return "Bearer " + internal_token(role, **claims)  # type: ignore[arg-type]


def test_a_token_is_verified_once_while_cached(verifications: list[str]) -> None:
    verifier = InternalTokenVerifier(AUTH)
    header = bearer(Role.MUNICIPALITY, municipality="131016")
    first = verifier.principal(header)
    assert verifier.principal(header) is first
    assert first.municipality == "131016"
    assert len(verifications) == 1


def test_no_header_is_refused_and_bad_tokens_are_never_cached(verifications: list[str]) -> None:
    verifier = InternalTokenVerifier(AUTH)
    with pytest.raises(Unauthorized):
        verifier.principal(None)
    for header in ("Bearer not.a.token", "Basic abc", bearer()[:-4] + "AAAA"):
        for _ in range(2):
            with pytest.raises(Unauthorized):
                verifier.principal(header)
    assert len(verifier) == 0


def test_an_anonymous_internal_token_names_the_anonymous_caller() -> None:
    assert InternalTokenVerifier(AUTH).principal(bearer(Role.ANONYMOUS)) == ANONYMOUS


def test_an_entry_expires_with_its_token(verifications: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = InternalTokenVerifier(AUTH)
    header = bearer(ttl_seconds=30)
    verifier.principal(header)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 31 + AUTH.clock_skew_seconds)
    with pytest.raises(Unauthorized, match="expired"):
        verifier.principal(header)
    assert len(verifications) == 2


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = TokenCache(size=2, ttl_seconds=60)
    now = time.time()
    for key in "ab":
        cache.put(key, CHIYODA, exp=now + 60, kid="k1", now=now)
    assert cache.get("a", now) is CHIYODA  # a is now the most recent
    cache.put("c", CHIYODA, exp=now + 60, kid="k1", now=now)  # evicts b
    assert (cache.get("a", now), cache.get("b", now), cache.get("c", now)) == (CHIYODA, None, CHIYODA)


def test_an_entry_lives_until_the_earlier_of_exp_and_the_ttl() -> None:
    cache = TokenCache(size=10, ttl_seconds=5)
    now = 1000.0
    cache.put("long", CHIYODA, exp=now + 60, kid="k1", now=now)
    cache.put("short", CHIYODA, exp=now + 2, kid="k1", now=now)
    assert cache.get("short", now + 3) is None
    assert cache.get("long", now + 4) is CHIYODA
    assert cache.get("long", now + 6) is None


def test_entries_leave_with_their_key() -> None:
    cache = TokenCache(size=10, ttl_seconds=60)
    now = time.time()
    cache.put("old", CHIYODA, exp=now + 60, kid="k-old", now=now)
    cache.put("new", CHIYODA, exp=now + 60, kid="k-new", now=now)
    assert cache.drop_kids({"k-old"}) == 1
    assert (cache.get("old", now), cache.get("new", now)) == (None, CHIYODA)


def test_size_zero_turns_the_cache_off() -> None:
    cache = TokenCache(size=0, ttl_seconds=60)
    cache.put("a", CHIYODA, exp=time.time() + 60, kid="k", now=time.time())
    assert len(cache) == 0


def test_the_test_helpers_headers_outlive_any_one_internal_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # Made once, as a module constant would be; a subject of its own, as the issuer's cache is shared.
    headers = internal_headers(Role.NATIONAL, subject="clock-test")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 10 * AUTH.internal_token_max_seconds)
    assert InternalTokenVerifier(AUTH).principal(headers["Authorization"]).role is Role.NATIONAL
