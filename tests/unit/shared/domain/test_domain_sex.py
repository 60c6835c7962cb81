"""Sex codes: the contract's M/F/U, 住基 codes 1/2/9/empty, and 男/女."""

from __future__ import annotations

import pytest

from shared.domain.sex import Sex, parse_sex


@pytest.mark.parametrize(
    ("value", "sex"),
    [
        ("M", Sex.MALE),
        ("F", Sex.FEMALE),
        ("U", Sex.UNKNOWN),
        ("m", Sex.MALE),
        ("f", Sex.FEMALE),
        ("1", Sex.MALE),
        ("2", Sex.FEMALE),
        ("9", Sex.UNKNOWN),
        ("", Sex.UNKNOWN),
        ("  ", Sex.UNKNOWN),
        (" 2 ", Sex.FEMALE),
        ("１", Sex.MALE),  # full-width, as 住基 exports often carry
        ("２", Sex.FEMALE),
        ("Ｆ", Sex.FEMALE),
        ("男", Sex.MALE),
        ("女", Sex.FEMALE),
        ("男性", Sex.MALE),
        ("女性", Sex.FEMALE),
        ("不明", Sex.UNKNOWN),
    ],
)
def test_parse_sex(value: str, sex: Sex) -> None:
    assert parse_sex(value) is sex


@pytest.mark.parametrize("value", ["0", "3", "8", "X", "MALE", "male", "女男", "12", "-"])
def test_unknown_spellings_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="must be one of"):
        parse_sex(value)


@pytest.mark.parametrize(
    ("sex", "value", "juki"), [(Sex.MALE, "M", "1"), (Sex.FEMALE, "F", "2"), (Sex.UNKNOWN, "U", "9")]
)
def test_values_and_juki_codes(sex: Sex, value: str, juki: str) -> None:
    assert sex == value
    assert sex.juki_code == juki
    assert parse_sex(juki) is sex
