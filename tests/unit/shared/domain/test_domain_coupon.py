"""The 18-digit coupon line (接種券): kind, dose, municipality code with check digit, coupon number."""

from __future__ import annotations

import pytest

from shared.domain.coupon import (
    COUPON_LINE_LENGTH,
    CouponLine,
    CouponLineError,
    coupon_number_problem,
    parse_coupon_line,
)


@pytest.mark.parametrize(
    ("line", "kind", "dose", "municipality", "number", "prefecture"),
    [
        ("110110020000000001", 1, 1, "011002", "0000000001", "01"),
        ("120110021234567890", 1, 2, "011002", "1234567890", "01"),
        ("231310169999999999", 2, 3, "131016", "9999999999", "13"),
        ("004720180000012345", 0, 0, "472018", "0000012345", "47"),  # dose digit 0: no dose printed
        ("990110700000000100", 9, 9, "011070", "0000000100", "01"),  # check digit 0
        ("150110111000000000", 1, 5, "011011", "1000000000", "01"),  # check digit 1
    ],
)
def test_valid_lines(line: str, kind: int, dose: int, municipality: str, number: str, prefecture: str) -> None:
    coupon = parse_coupon_line(line)
    assert coupon == CouponLine(kind=kind, dose_number=dose, municipality_code=municipality, coupon_number=number)
    assert coupon.prefecture == prefecture
    assert str(coupon) == line


@pytest.mark.parametrize(
    ("line", "message_contains"),
    [
        ("", "exactly 18 digits"),
        ("11011002000000001", "exactly 18 digits"),  # 17: a digit dropped by OCR
        ("1101100200000000011", "exactly 18 digits"),  # 19
        ("11011002000000000A", "exactly 18 digits"),
        ("11-011002-00000001", "exactly 18 digits"),
        ("11 011002 00000001", "exactly 18 digits"),
        ("１１０１１００２００００００００１", "exactly 18 digits"),  # full-width digits from an IME
        ("110110020000000001\n", "exactly 18 digits"),
        ("110110030000000001", "check digit"),  # 011003: OCR misread of the check digit
        ("110110120000000001", "check digit"),  # 011012: misread of a body digit
        ("111010020000000001", "check digit"),  # 101002: transposition
        ("114810090000000001", "prefecture part '48'"),  # check digit right, prefecture 48
        ("110000010000000001", "prefecture part '00'"),  # check digit right, prefecture 00
        ("110110020000000000", "0000000000 is never issued"),
        ("110000000000000000", "municipality code 000000"),  # the reservation-site failure
    ],
)
def test_invalid_lines(line: str, message_contains: str) -> None:
    with pytest.raises(CouponLineError) as exc_info:
        parse_coupon_line(line)
    assert message_contains in str(exc_info.value)


def test_coupon_line_error_is_a_value_error() -> None:
    assert issubclass(CouponLineError, ValueError)
    assert COUPON_LINE_LENGTH == 18


@pytest.mark.parametrize("last", [d for d in "0123456789" if d != "2"])
def test_every_wrong_municipality_check_digit_is_rejected(last: str) -> None:
    with pytest.raises(CouponLineError, match="check digit"):
        parse_coupon_line(f"1101100{last}0000000001")


@pytest.mark.parametrize(
    ("number", "problem"),
    [
        ("0000000001", None),
        ("1234567890", None),
        ("9999999999", None),
        ("0000000000", "0000000000 is never issued"),
        ("000000001", "must be exactly 10 digits"),
        ("00000000001", "must be exactly 10 digits"),
        ("000000000a", "must be exactly 10 digits"),
        ("００００００００１", "must be exactly 10 digits"),
        ("", "must be exactly 10 digits"),
    ],
)
def test_coupon_number_problem(number: str, problem: str | None) -> None:
    assert coupon_number_problem(number) == problem
