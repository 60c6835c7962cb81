"""Check digits: JIS X 0402 municipality codes and My Number (DOMAIN.md)."""

from __future__ import annotations

import csv

import pytest

from shared.domain.codes import (
    is_valid_institution_code,
    is_valid_municipality_code,
    is_valid_my_number,
    is_valid_prefecture_code,
    mask_my_number,
    municipality_check_digit,
    municipality_code_problem,
    my_number_check_digit,
    my_number_problem,
    prefecture_of,
)
from tests.factories import team_data

# --- municipality codes (JIS X 0402, modulus 11) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "name"),
    [
        ("011002", "札幌市 (DOMAIN.md example)"),
        ("011011", "札幌市 中央区 (s mod 11 = 0: check digit 1)"),
        ("011070", "札幌市 西区 (s mod 11 = 1: check digit 0)"),
        ("011061", "札幌市 南区 (s mod 11 = 10: check digit 1)"),
        ("012025", "函館市"),
        ("131016", "千代田区"),
        ("141003", "横浜市"),
        ("261009", "京都市"),
        ("271004", "大阪市"),
        ("472018", "那覇市"),
    ],
)
def test_real_municipality_codes_are_valid(code: str, name: str) -> None:
    assert municipality_check_digit(code[:5]) == int(code[5]), name
    assert municipality_code_problem(code) is None, name
    assert is_valid_municipality_code(code), name


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("01100", 2),  # s = 9
        ("01101", 1),  # s = 11, remainder 0 -> (11 - 0) mod 10
        ("01107", 0),  # s = 23, remainder 1 -> 10 mod 10
        ("00000", 1),  # s = 0
        ("47201", 8),
        ("99999", 7),  # s = 180, remainder 4
    ],
)
def test_municipality_check_digit(body: str, expected: int) -> None:
    assert municipality_check_digit(body) == expected


@pytest.mark.parametrize("body", ["", "0110", "011002", "0110a", "01 00", "０１１００", "-1100", "+1100"])
def test_municipality_check_digit_rejects_non_bodies(body: str) -> None:
    with pytest.raises(ValueError):
        municipality_check_digit(body)


@pytest.mark.parametrize("body", ["01100", "13101", "47201", "00000", "99999", "12345"])
def test_exactly_one_check_digit_fits_each_body(body: str) -> None:
    fitting = [d for d in "0123456789" if municipality_check_digit(body) == int(d)]
    assert len(fitting) == 1


@pytest.mark.parametrize(
    ("code", "problem_contains"),
    [
        ("011003", "check digit"),  # 札幌市 with the check digit off by one
        ("011001", "check digit"),
        ("011020", "check digit"),  # transposed last two digits of 011002
        ("101002", "check digit"),  # transposed first two digits of 011002
        ("131017", "check digit"),
        ("000000", "prefecture part '00'"),  # the reservation-site failure
        ("000001", "prefecture part '00'"),  # check digit right, prefecture 00
        ("481009", "prefecture part '48'"),  # check digit right, prefecture 48
        ("991000", "prefecture part '99'"),
        ("01100", "6 digits"),
        ("0110022", "6 digits"),
        ("", "6 digits"),
        ("01100a", "6 digits"),
        ("01-002", "6 digits"),
        (" 11002", "6 digits"),
        ("011002\n", "6 digits"),
        ("０１１００２", "6 digits"),  # full-width digits: str.isdigit() alone would accept them
        ("٠١١٠٠٢", "6 digits"),  # Arabic-Indic digits, same trap
    ],
)
def test_invalid_municipality_codes(code: str, problem_contains: str) -> None:
    problem = municipality_code_problem(code)
    assert problem is not None
    assert problem_contains in problem
    assert not is_valid_municipality_code(code)


def test_every_wrong_check_digit_of_sapporo_is_rejected() -> None:
    wrong = [f"01100{d}" for d in "0123456789" if d != "2"]
    assert [is_valid_municipality_code(c) for c in wrong] == [False] * 9


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        ("01", True),
        ("13", True),
        ("47", True),
        ("00", False),
        ("48", False),
        ("1", False),
        ("013", False),
        ("０１", False),
        ("1a", False),
    ],
)
def test_prefecture_codes(code: str, valid: bool) -> None:
    assert is_valid_prefecture_code(code) is valid


@pytest.mark.parametrize(("code", "prefecture"), [("011002", "01"), ("131016", "13"), ("472018", "47")])
def test_prefecture_of(code: str, prefecture: str) -> None:
    assert prefecture_of(code) == prefecture


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        ("0112345678", True),
        ("4700000001", True),
        ("0012345678", False),
        ("4812345678", False),
        ("011234567", False),
        ("01123456789", False),
        ("01123456a8", False),
        ("０１１２３４５６７８", False),
    ],
)
def test_institution_codes(code: str, valid: bool) -> None:
    assert is_valid_institution_code(code) is valid


def test_all_municipality_codes_of_the_team_data_file() -> None:
    path = team_data("municipalities/localgovjp-utf8.csv")
    # The file starts with a UTF-8 BOM; utf-8-sig keeps it out of the first column's name.
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))

    codes = [row["lgcode"] for row in rows]
    assert len(codes) == 1916
    assert len(set(codes)) == 1916
    invalid = {c: municipality_code_problem(c) for c in codes if not is_valid_municipality_code(c)}
    assert invalid == {}
    wrong_prefecture = {
        row["lgcode"]: row["pid"] for row in rows if prefecture_of(row["lgcode"]) != row["pid"].zfill(2)
    }
    assert wrong_prefecture == {}
    assert {prefecture_of(c) for c in codes} == {f"{p:02d}" for p in range(1, 48)}


# --- My Number (個人番号) --------------------------------------------------------------------------------------


def _reference_my_number_check_digit(first_eleven: str) -> int:
    """DOMAIN.md's formula written out independently of the implementation."""
    total = 0
    for n in range(1, 12):
        p = int(first_eleven[11 - n])
        q = n + 1 if n <= 6 else n - 5
        total += p * q
    r = total % 11
    return 0 if r <= 1 else 11 - r


def test_my_number_check_digit_matches_domain_formula_digit_by_digit() -> None:
    # Each position with each digit, on top of two backgrounds: every entry of the look-up tables is used.
    bodies = [
        background[:j] + digit + background[j + 1 :]
        for background in ("00000000000", "98765432109")
        for j in range(11)
        for digit in "0123456789"
    ]
    bodies += [f"{n * 7919 % 10**11:011d}" for n in range(1, 3001)]  # spread over the whole range
    for body in bodies:
        assert my_number_check_digit(body) == _reference_my_number_check_digit(body), body


@pytest.mark.parametrize(
    "number",
    [
        "123456789018",  # DOMAIN.md example
        "000000000000",  # r = 0 -> 0
        "000000000060",  # P1 = 6: r = 12 mod 11 = 1 -> 0
        "000000000051",  # P1 = 5: r = 10 -> 1
        "111111111118",  # weights sum to 47, r = 3 -> 8
        "999999999996",  # 9 * 47 = 423, r = 5 -> 6
        "100000000005",  # P11 = 1, weight Q11 = 6: r = 6 -> 5
    ],
)
def test_valid_my_numbers(number: str) -> None:
    assert my_number_check_digit(number[:11]) == int(number[11])
    assert my_number_problem(number) is None
    assert is_valid_my_number(number)


@pytest.mark.parametrize("last", [d for d in "0123456789" if d != "8"])
def test_every_wrong_last_digit_of_the_example_is_invalid(last: str) -> None:
    number = "12345678901" + last
    assert my_number_problem(number) == "check digit does not match"
    assert not is_valid_my_number(number)


@pytest.mark.parametrize(
    "body", ["12345678901", "00000000000", "99999999999", "31415926535", "27182818284", "10000000000", "00000000001"]
)
def test_my_number_check_digit_matches_domain_formula(body: str) -> None:
    assert my_number_check_digit(body) == _reference_my_number_check_digit(body)


@pytest.mark.parametrize(
    "number",
    [
        "",
        "12345678901",
        "1234567890188",
        "1234-5678-9018",
        "12345678901a",
        " 23456789018",
        "１２３４５６７８９０１８",  # full-width
        "213456789018",  # transposition of the first two digits
    ],
)
def test_invalid_my_numbers(number: str) -> None:
    assert my_number_problem(number) is not None
    assert not is_valid_my_number(number)


@pytest.mark.parametrize("body", ["1234567890", "123456789012", "1234567890a", "１２３４５６７８９０１"])
def test_my_number_check_digit_rejects_non_bodies(body: str) -> None:
    with pytest.raises(ValueError):
        my_number_check_digit(body)


@pytest.mark.parametrize(
    ("number", "masked"),
    [("123456789018", "********9018"), ("000000000000", "********0000"), ("999999999996", "********9996")],
)
def test_mask_my_number_shows_only_the_last_four(number: str, masked: str) -> None:
    shown = mask_my_number(number)
    assert shown == masked
    assert len(shown) == 12
    assert number[:8] not in shown
