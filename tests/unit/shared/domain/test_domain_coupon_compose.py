"""Composing the 18-digit coupon line (the inverse of parsing) and drawing new coupon numbers."""

from __future__ import annotations

import random
from itertools import islice

import pytest

from shared.domain.coupon import (
    CouponLineError,
    candidate_coupon_numbers,
    compose_coupon_line,
    coupon_number_problem,
    parse_coupon_line,
)


@pytest.mark.parametrize(
    ("kind", "dose", "municipality", "number", "line"),
    [
        (1, 1, "011002", "0000000001", "110110020000000001"),
        (1, 2, "011002", "1234567890", "120110021234567890"),
        (2, 3, "131016", "9999999999", "231310169999999999"),
        (0, 0, "472018", "0000012345", "004720180000012345"),  # lowest kind and dose digits
        (9, 9, "011070", "0000000100", "990110700000000100"),  # highest
    ],
)
def test_compose_is_the_inverse_of_parse(kind: int, dose: int, municipality: str, number: str, line: str) -> None:
    composed = compose_coupon_line(kind=kind, dose_number=dose, municipality_code=municipality, coupon_number=number)
    assert composed == line
    parsed = parse_coupon_line(composed)
    assert (parsed.kind, parsed.dose_number, parsed.municipality_code, parsed.coupon_number) == (
        kind,
        dose,
        municipality,
        number,
    )


@pytest.mark.parametrize(
    ("kind", "dose", "municipality", "number", "reason"),
    [
        (10, 1, "011002", "0000000001", "kind"),
        (-1, 1, "011002", "0000000001", "kind"),
        (1, 10, "011002", "0000000001", "dose number 10"),  # a 10th dose has no digit on the coupon
        (1, -1, "011002", "0000000001", "dose number"),
        (1, 1, "011003", "0000000001", "check digit"),
        (1, 1, "000000", "0000000001", "municipality code"),
        (1, 1, "01100", "0000000001", "6 digits"),
        (1, 1, "011002", "0000000000", "never issued"),
        (1, 1, "011002", "000000001", "10 digits"),
        (1, 1, "011002", "00000000001", "10 digits"),
        (1, 1, "011002", "１２３４５６７８９０", "10 digits"),  # full-width digits are not printed
    ],
)
def test_compose_refuses_what_cannot_be_printed(
    kind: int, dose: int, municipality: str, number: str, reason: str
) -> None:
    with pytest.raises(CouponLineError, match=reason):
        compose_coupon_line(kind=kind, dose_number=dose, municipality_code=municipality, coupon_number=number)


def test_candidates_are_valid_ten_digit_numbers() -> None:
    numbers = list(islice(candidate_coupon_numbers(random.Random(7).randrange), 2000))
    assert all(coupon_number_problem(n) is None for n in numbers)
    assert len(set(numbers)) == len(numbers)  # 2,000 draws from 10^10: a repeat would mean a broken source


@pytest.mark.parametrize(
    ("draw", "number"),
    [
        (0, "0000000001"),  # the lowest draw is shifted past 0000000000
        (1, "0000000002"),
        (9_999_999_998, "9999999999"),  # the highest draw
    ],
)
def test_candidate_bounds(draw: int, number: str) -> None:
    bounds: list[int] = []

    def source(n: int) -> int:
        bounds.append(n)
        return draw

    assert next(candidate_coupon_numbers(source)) == number
    assert bounds == [9_999_999_999]


def test_a_seeded_source_repeats_its_candidates() -> None:
    first = list(islice(candidate_coupon_numbers(random.Random(1).randrange), 5))
    again = list(islice(candidate_coupon_numbers(random.Random(1).randrange), 5))
    assert first == again
