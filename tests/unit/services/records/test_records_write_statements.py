"""Concurrent writes of one shard share a statement only when they share no coupon and no key: a write that
holds what an earlier one holds goes in a statement after it (and so sees what that one stored)."""

from __future__ import annotations

import pytest

from services.records.repository import DoseWrite, statements_of


def write(scope: str, key: str, *coupons: str) -> DoseWrite:
    return DoseWrite(
        scope, [("131016", c) for c in coupons], [0] * len(coupons), [], [], [{"scope": scope, "key": key}], [], []
    )


@pytest.mark.parametrize(
    ("writes", "statements"),
    [
        pytest.param([write("a", "k1", "1")], [[0]], id="alone"),
        pytest.param([write("a", "k1", "1"), write("a", "k2", "2"), write("b", "k3", "3")], [[0, 1, 2]], id="disjoint"),
        pytest.param([write("a", "k1", "1"), write("a", "k2", "1")], [[0], [1]], id="same-coupon"),
        pytest.param([write("a", "k1", "1"), write("a", "k1", "2")], [[0], [1]], id="same-key"),
        pytest.param([write("a", "k1", "1"), write("b", "k1", "2")], [[0, 1]], id="same-key-name-other-caller"),
        pytest.param(
            [write("a", "k1", "1"), write("a", "k2", "1"), write("a", "k3", "1"), write("a", "k4", "2")],
            [[0, 3], [1], [2]], id="a-coupon-three-times-in-order",
        ),
        pytest.param(
            [write("a", "k1", "1"), write("a", "k2", "1", "2"), write("a", "k3", "2")],
            [[0], [1], [2]], id="chained-through-a-second-coupon",
        ),
        pytest.param(
            [write("a", "k1", "1", "2"), write("a", "k2", "3"), write("a", "k3", "2"), write("a", "k4", "4")],
            [[0, 1, 3], [2]], id="later-disjoint-writes-stay-in-the-first",
        ),
    ],
)  # fmt: skip
def test_writes_sharing_a_coupon_or_key_go_in_later_statements(
    writes: list[DoseWrite], statements: list[list[int]]
) -> None:
    assert statements_of(writes) == statements
