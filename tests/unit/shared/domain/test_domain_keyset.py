"""The compact key set that finds repeated ids in a file of millions of rows."""

from __future__ import annotations

import random

import pytest

from shared.domain.keyset import KeySet, text_key


def test_add_says_whether_a_key_is_new_across_growth() -> None:
    keys = KeySet()
    rng = random.Random(5)
    values = list({rng.randrange(1, 1 << 64) for _ in range(20_000)}) + list(range(1, 5001))  # spread and dense
    assert all(keys.add(v) for v in values)
    assert len(keys) == len(values)
    assert not any(keys.add(v) for v in values)
    assert all(v in keys for v in values)
    assert len(keys) == len(values)


@pytest.mark.parametrize(("key", "present"), [(1, True), ((1 << 64) - 1, True), (2, False), (1 << 63, False)])
def test_contains_at_the_bounds(key: int, present: bool) -> None:
    keys = KeySet()
    keys.add(1)
    keys.add((1 << 64) - 1)
    assert (key in keys) is present


@pytest.mark.parametrize("key", [0, -1, 1 << 64])
def test_keys_outside_64_bits_or_zero_are_refused(key: int) -> None:
    with pytest.raises(ValueError, match="non-zero 64-bit"):
        KeySet().add(key)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("123", "123", True),
        ("123", "0123", False),  # leading zeros are a different id
        ("0", "00", False),
        ("12345678901234567", "12345678901234567", True),  # 17 digits: exact
        ("123456789012345678", "123456789012345678", True),  # 18 digits: hashed, still equal
        ("123456789012345678", "123456789012345679", False),
        ("R-1", "R-1", True),
        ("R-1", "R-2", False),
        ("R-1", "r-1", False),
        ("1", "R1", False),
    ],
)
def test_text_key(a: str, b: str, same: bool) -> None:
    assert (text_key(a) == text_key(b)) is same
    assert 0 < text_key(a) < 1 << 64


def test_numeric_and_hashed_keys_never_meet() -> None:
    numeric = {text_key(str(n)) for n in range(10_000)}
    hashed = {text_key(f"R{n}") for n in range(10_000)}
    assert len(numeric) == len(hashed) == 10_000
    assert not numeric & hashed


@pytest.mark.parametrize("batch", [1, 7, 1000, 30_000])
def test_add_many_says_what_add_says_in_order(batch: int) -> None:
    rng = random.Random(11)
    # Repeats across batches and inside one, zeros (no key) among them, enough keys to grow the table.
    values = [rng.choice([0, rng.randrange(1, 3000), rng.randrange(1, 1 << 64)]) for _ in range(25_000)]
    one, many = KeySet(), KeySet()
    expected = [i for i, v in enumerate(values) if v and not one.add(v)]
    got = []
    for start in range(0, len(values), batch):
        got += [start + i for i in many.add_many(values[start : start + batch])]
    assert got == expected
    assert len(many) == len(one)
    assert all(v in many for v in values if v)


def test_add_many_refuses_keys_outside_64_bits() -> None:
    with pytest.raises(ValueError, match="non-zero 64-bit"):
        KeySet().add_many([1, 1 << 64])


@pytest.mark.parametrize("expected", [0, 1, 600, 5000])
def test_a_set_sized_for_its_keys_holds_them_and_more(expected: int) -> None:
    keys = KeySet(expected)
    assert keys.add_many(range(1, expected + 3001)) == []
    assert keys.add_many([1, expected + 3000]) == [0, 1] and len(keys) == expected + 3000
