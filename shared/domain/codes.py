"""Check digits of the numbers VRS must never trust unchecked (see DOMAIN.md)."""

from __future__ import annotations

import functools
from operator import mul

_MUNICIPALITY_WEIGHTS = (6, 5, 4, 3, 2)


def municipality_check_digit(first_five: str) -> int:
    """JIS X 0402 (全国地方公共団体コード) modulus-11 check digit of a 5-digit code."""
    if len(first_five) != 5 or not first_five.isascii() or not first_five.isdigit():
        raise ValueError("a municipality code body is exactly 5 ASCII digits")
    s = sum(w * int(d) for w, d in zip(_MUNICIPALITY_WEIGHTS, first_five, strict=True))
    return (11 - s % 11) % 10


def prefecture_of(municipality_code: str) -> str:
    """The 2-digit JIS prefecture code (都道府県コード): the first two digits of a municipality code."""
    return municipality_code[:2]


def is_valid_prefecture_code(code: str) -> bool:
    return len(code) == 2 and code.isascii() and code.isdigit() and 1 <= int(code) <= 47


# Asked for every dose and resident: a thousand-dose batch repeats a handful of codes, and Japan has 1,741.
@functools.lru_cache(maxsize=4096)
def municipality_code_problem(code: str) -> str | None:
    """Why ``code`` is not a plausible 6-digit municipality code, or None when it is."""
    if len(code) != 6 or not code.isascii() or not code.isdigit():
        return "must be exactly 6 digits"
    if not is_valid_prefecture_code(code[:2]):
        return f"prefecture part '{code[:2]}' is not 01-47"
    if municipality_check_digit(code[:5]) != int(code[5]):
        return "check digit does not match (JIS X 0402 modulus 11)"
    return None


def is_valid_municipality_code(code: str) -> bool:
    return municipality_code_problem(code) is None


# 個人番号 check digit: Q_n for n = 1..11, P_n counted from the right of the first 11 digits.
_MY_NUMBER_WEIGHTS = tuple(n + 1 if n <= 6 else n - 5 for n in range(1, 12))


def _weighted_sums(start: int, width: int) -> dict[str, int]:
    """Every ``width``-digit piece of a body at ``start`` (from the left) → its part of the weighted sum."""
    weights = [_MY_NUMBER_WEIGHTS[10 - j] for j in range(start, start + width)]  # P_n counts from the right
    return {f"{value:0{width}d}": sum(map(mul, map(int, f"{value:0{width}d}"), weights)) for value in range(10**width)}


# The sum in four table look-ups instead of eleven multiplications: a resident import checks millions of
# numbers, and this was the largest single cost of checking a row (1.1 µs; 0.4 µs with the tables).
_PIECES = tuple(
    (start, start + width, _weighted_sums(start, width)) for start, width in ((0, 3), (3, 3), (6, 3), (9, 2))
)
(_, _, _S0), (_, _, _S1), (_, _, _S2), (_, _, _S3) = _PIECES


def my_number_check_digit(first_eleven: str) -> int:
    if len(first_eleven) != 11 or not first_eleven.isascii() or not first_eleven.isdigit():
        raise ValueError("a My Number body is exactly 11 ASCII digits")
    r = (_S0[first_eleven[:3]] + _S1[first_eleven[3:6]] + _S2[first_eleven[6:9]] + _S3[first_eleven[9:]]) % 11
    return 0 if r <= 1 else 11 - r


def my_number_problem(number: str) -> str | None:
    if len(number) != 12 or not number.isascii() or not number.isdigit():
        return "must be exactly 12 digits"
    if my_number_check_digit(number[:11]) != int(number[11]):
        return "check digit does not match"
    return None


def is_valid_my_number(number: str) -> bool:
    return my_number_problem(number) is None


def mask_my_number(number: str) -> str:
    """What may be shown of a My Number: the last four digits (``********9018``)."""
    return "*" * 8 + number[-4:]


def is_valid_institution_code(code: str) -> bool:
    """医療機関コード: 10 digits beginning with the prefecture code. (Its own check digit is not in DOMAIN.md.)"""
    return len(code) == 10 and code.isascii() and code.isdigit() and is_valid_prefecture_code(code[:2])
