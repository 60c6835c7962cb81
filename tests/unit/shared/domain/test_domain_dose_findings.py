"""The rules added for issue 7: AstraZeneca's longest interval, Novavax boosters, lot formats, the 1..10 dose
numbers, coupons no longer valid, findings that disclose nothing, and the double scan."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import date, timedelta

import pytest

from shared.domain.dose_rules import (
    FINDING_MESSAGES,
    CouponInvalidReason,
    CouponValidity,
    DoseFacts,
    DoseOnFile,
    DoseRejected,
    EarlierDose,
    Finding,
    FindingCode,
    check_admissible,
    find_exact_duplicate,
    is_exact_duplicate,
    review_findings,
)
from shared.domain.vaccines import VaccineRules, add_months, default_rules, parse_rules

RULES: VaccineRules = default_rules()
TODAY = date(2024, 1, 10)
LINE = "11011002" + "0000000001"  # 札幌市 011002, coupon 0000000001, printed for dose 1
LINE_ANY = "10011002" + "0000000001"  # the same coupon, 回数 0: no dose digit to disagree with


def facts(
    dose_number: int = 1,
    vaccinated_on: date = date(2021, 6, 1),
    vaccine: str = "pfizer",
    lot_number: str | None = None,
) -> DoseFacts:
    return DoseFacts(
        coupon_line=LINE_ANY,
        dose_number=dose_number,
        vaccinated_on=vaccinated_on,
        vaccine=vaccine,
        lot_number=lot_number,
    )


def review(
    dose: DoseFacts, earlier: list[EarlierDose] | None = None, validity: CouponValidity | None = None
) -> list[Finding]:
    coupon = check_admissible(dose, today=TODAY, rules=RULES)
    return review_findings(dose, coupon, earlier or [], rules=RULES, validity=validity)


def codes(findings: list[Finding]) -> list[FindingCode]:
    return [f.code for f in findings]


# --- dose number 1..10 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dose_number", "admissible"), [(0, False), (1, True), (10, True), (11, False), (99, False)])
def test_dose_number_between_1_and_10(dose_number: int, admissible: bool) -> None:
    dose = facts(dose_number, date(2023, 10, 1))
    assert RULES.max_dose_number == 10
    if admissible:
        check_admissible(dose, today=TODAY, rules=RULES)
    else:
        with pytest.raises(DoseRejected) as exc_info:
            check_admissible(dose, today=TODAY, rules=RULES)
        assert exc_info.value.field == "dose_number"
        assert "between 1 and 10" in exc_info.value.message


# --- AstraZeneca: 4 to 12 weeks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vaccine", "gap_days", "expected"),
    [
        ("astrazeneca", 27, [FindingCode.INTERVAL_TOO_SHORT]),
        ("astrazeneca", 28, []),
        ("astrazeneca", 56, []),  # 8 weeks, the recommended interval
        ("astrazeneca", 84, []),  # exactly 12 weeks
        ("astrazeneca", 85, [FindingCode.INTERVAL_TOO_LONG]),
        ("astrazeneca", 200, [FindingCode.INTERVAL_TOO_LONG]),
        # Only AstraZeneca has a longest interval.
        ("pfizer", 85, []),
        ("moderna", 200, []),
        ("novavax", 200, []),
    ],
)
def test_primary_series_longest_interval(vaccine: str, gap_days: int, expected: list[FindingCode]) -> None:
    first = date(2021, 6, 1)
    dose = facts(2, first + timedelta(days=gap_days), vaccine)
    assert codes(review(dose, [EarlierDose(1, first, vaccine)])) == expected


def test_primary_series_is_judged_by_the_first_dose_product() -> None:
    first = date(2021, 6, 1)
    late = facts(2, first + timedelta(days=85), "pfizer")
    assert codes(review(late, [EarlierDose(1, first, "astrazeneca")])) == [FindingCode.INTERVAL_TOO_LONG]


# --- Novavax boosters: at least 6 months -------------------------------------------------------------------------

PREVIOUS = date(2023, 1, 15)


@pytest.mark.parametrize(
    ("vaccine", "booster", "expected"),
    [
        # 2023: the general rule is 3 months, Novavax's own 6 months is stricter.
        ("novavax", add_months(PREVIOUS, 6) - timedelta(days=1), [FindingCode.INTERVAL_TOO_SHORT]),
        ("novavax", add_months(PREVIOUS, 6), []),
        ("novavax", add_months(PREVIOUS, 3), [FindingCode.INTERVAL_TOO_SHORT]),
        ("moderna", add_months(PREVIOUS, 3), []),  # another product: the general 3 months
        ("moderna", add_months(PREVIOUS, 3) - timedelta(days=1), [FindingCode.INTERVAL_TOO_SHORT]),
    ],
)
def test_novavax_booster_six_months(vaccine: str, booster: date, expected: list[FindingCode]) -> None:
    earlier = [EarlierDose(1, date(2021, 6, 1), "pfizer"), EarlierDose(2, PREVIOUS, "pfizer")]
    assert codes(review(facts(3, booster, vaccine), earlier)) == expected


@pytest.mark.parametrize(
    ("booster", "expected"),
    [
        # 2022: the general 7 months is stricter than Novavax's 6.
        (date(2022, 12, 31), [FindingCode.INTERVAL_TOO_SHORT]),  # 6 months + 30 days after 2022-06-01
        (date(2023, 1, 1), []),  # from 2023 Novavax's own 6 months applies: 7 months after, fine
    ],
)
def test_novavax_booster_takes_the_stricter_rule(booster: date, expected: list[FindingCode]) -> None:
    previous = date(2022, 6, 1)
    earlier = [EarlierDose(1, date(2021, 6, 1), "pfizer"), EarlierDose(2, previous, "pfizer")]
    assert codes(review(facts(3, booster, "novavax"), earlier)) == expected


# --- lot number formats ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vaccine", "lot", "ok"),
    [
        ("pfizer", "EY0583", True),
        ("pfizer", "FF2782", True),
        ("pfizer", "FA5765", True),
        ("pfizer", "EY1234", True),  # the demo, bench and e2e lots
        ("pfizer", "FA1234", True),
        ("pfizer", "ey0583", True),  # typed in lower case
        ("pfizer", "ＥＹ０５８３", True),  # full-width, from a Japanese IME
        (" pfizer", "EY0583", True),  # unknown product: rejected elsewhere, no lot finding
        ("pfizer", "EY058", False),
        ("pfizer", "EY05833", False),
        ("pfizer", "3004734", False),  # a Moderna lot recorded as Pfizer
        ("pfizer", "EY-0583", False),
        ("pfizer", "X", False),
        ("moderna", "3002330", True),
        ("moderna", "3004734", True),
        ("moderna", "000054A", True),
        ("moderna", "300473", False),
        ("moderna", "30047345", False),
        ("moderna", "EY1234", False),  # the demo's Moderna rows use Pfizer-style lots
        ("astrazeneca", "PV46672", True),
        ("astrazeneca", "ABV5811", True),
        ("astrazeneca", "MT0055", True),
        ("astrazeneca", "ABVX5811", False),
        ("astrazeneca", "PV466721", False),
        ("astrazeneca", "3004734", False),
        ("novavax", "4302MF005", True),
        ("novavax", "TZ0117", True),
        ("novavax", "ABC", False),
        ("novavax", "4302MF00512", False),
        ("novavax", "4302 MF005", False),
    ],
)
def test_lot_format(vaccine: str, lot: str, ok: bool) -> None:
    dose = facts(vaccine=vaccine, lot_number=lot)
    if vaccine not in RULES.products:
        with pytest.raises(DoseRejected):
            review(dose)
        return
    found = review(dose)
    assert codes(found) == ([] if ok else [FindingCode.LOT_FORMAT])
    assert RULES.products[vaccine].lot_matches(lot) is ok


def test_lot_is_not_checked_when_not_given() -> None:
    assert review(facts(lot_number=None)) == []


def test_product_without_a_lot_pattern_accepts_any_lot() -> None:
    rules = parse_rules(
        'version = "t"\nprogram_start = "2021-02-17"\nmax_dose_number = 10\n'
        '[[products]]\ncode = "x"\nlabel = "x"\nprimary_min_days = 1\n'
    )
    assert rules.products["x"].lot_matches("anything at all")


def test_a_broken_lot_pattern_fails_at_load() -> None:
    with pytest.raises(re.error):
        parse_rules(
            'version = "t"\nprogram_start = "2021-02-17"\nmax_dose_number = 10\n'
            '[[products]]\ncode = "x"\nlabel = "x"\nprimary_min_days = 1\nlot_pattern = "[A-Z"\n'
        )


# --- coupons no longer valid -------------------------------------------------------------------------------------

END = date(2022, 3, 31)


@pytest.mark.parametrize(
    ("validity", "vaccinated_on", "expected"),
    [
        (None, date(2023, 1, 1), []),
        (CouponValidity(END, CouponInvalidReason.MOVED_OUT), END, []),
        (CouponValidity(END, CouponInvalidReason.MOVED_OUT), END + timedelta(days=1), [FindingCode.COUPON_NOT_VALID]),
        (CouponValidity(END, CouponInvalidReason.REISSUED), END - timedelta(days=1), []),
        (CouponValidity(END, CouponInvalidReason.REISSUED), date(2023, 1, 1), [FindingCode.COUPON_NOT_VALID]),
        (CouponValidity(END, CouponInvalidReason.VOIDED), END + timedelta(days=1), [FindingCode.COUPON_NOT_VALID]),
        # Moving out on a day: a dose that day is still fine, the next day's is not.
        (CouponValidity.moved_out(END), END, []),
        (CouponValidity.moved_out(END), END + timedelta(days=1), [FindingCode.COUPON_NOT_VALID]),
        # Reissued or voided on a day: invalid from that very day.
        (CouponValidity.reissued(END), END - timedelta(days=1), []),
        (CouponValidity.reissued(END), END, [FindingCode.COUPON_NOT_VALID]),
        (CouponValidity.voided(END), END - timedelta(days=1), []),
        (CouponValidity.voided(END), END, [FindingCode.COUPON_NOT_VALID]),
    ],
)
def test_coupon_no_longer_valid(
    validity: CouponValidity | None, vaccinated_on: date, expected: list[FindingCode]
) -> None:
    assert codes(review(facts(vaccinated_on=vaccinated_on), validity=validity)) == expected


@pytest.mark.parametrize(
    ("validity", "reason"),
    [
        (CouponValidity.moved_out(END), CouponInvalidReason.MOVED_OUT),
        (CouponValidity.reissued(END), CouponInvalidReason.REISSUED),
        (CouponValidity.voided(END), CouponInvalidReason.VOIDED),
    ],
)
def test_coupon_validity_reasons(validity: CouponValidity, reason: CouponInvalidReason) -> None:
    assert validity.reason is reason
    (finding,) = review(facts(vaccinated_on=END + timedelta(days=1)), validity=validity)
    assert reason.value in finding.detail
    assert reason.value not in finding.message


# --- findings never disclose other records -----------------------------------------------------------------------

OTHER_DATES = (date(2021, 6, 20), date(2021, 9, 30))


@pytest.mark.parametrize(
    ("dose", "earlier", "code"),
    [
        (facts(1, date(2021, 6, 1)), [EarlierDose(1, OTHER_DATES[0], "moderna")], FindingCode.DUPLICATE_DOSE),
        (facts(2, date(2021, 6, 1)), [EarlierDose(1, OTHER_DATES[0], "moderna")], FindingCode.DOSE_ORDER),
        (facts(1, date(2021, 10, 5)), [EarlierDose(2, OTHER_DATES[1], "moderna")], FindingCode.DOSE_ORDER),
        (facts(2, date(2021, 6, 25)), [EarlierDose(1, OTHER_DATES[0], "moderna")], FindingCode.INTERVAL_TOO_SHORT),
        (facts(2, date(2022, 1, 5)), [EarlierDose(1, OTHER_DATES[1], "astrazeneca")], FindingCode.INTERVAL_TOO_LONG),
        (
            facts(3, date(2022, 2, 1)),
            [EarlierDose(1, OTHER_DATES[0], "moderna"), EarlierDose(2, OTHER_DATES[1], "moderna")],
            FindingCode.INTERVAL_TOO_SHORT,
        ),
    ],
)
def test_messages_disclose_nothing_details_do(dose: DoseFacts, earlier: list[EarlierDose], code: FindingCode) -> None:
    (finding,) = review(dose, earlier)
    assert finding.code is code
    assert finding.message == FINDING_MESSAGES[code]
    secrets = [d.isoformat() for d in OTHER_DATES] + ["moderna", "astrazeneca", "dose 1", "dose 2", "days"]
    assert not [s for s in secrets if s in finding.message]
    assert any(d.vaccinated_on.isoformat() in finding.detail for d in earlier)
    assert finding.as_dict(with_detail=False) == {"code": code.value, "message": finding.message}
    assert finding.as_dict(with_detail=True) == {
        "code": code.value,
        "message": finding.message,
        "detail": finding.detail,
    }


def test_every_code_has_a_generic_message() -> None:
    assert set(FINDING_MESSAGES) == set(FindingCode)
    assert all(message and not any(c.isdigit() for c in message) for message in FINDING_MESSAGES.values())


@pytest.mark.parametrize(
    ("code", "value"),
    [
        (FindingCode.COUPON_DOSE_MISMATCH, "coupon_dose_mismatch"),
        (FindingCode.DUPLICATE_DOSE, "duplicate_dose"),
        (FindingCode.DOSE_ORDER, "dose_order"),
        (FindingCode.INTERVAL_TOO_SHORT, "interval_too_short"),
        (FindingCode.INTERVAL_TOO_LONG, "interval_too_long"),
        (FindingCode.LOT_FORMAT, "lot_format"),
        (FindingCode.COUPON_NOT_VALID, "coupon_not_valid"),
    ],
)
def test_codes_are_stable(code: FindingCode, value: str) -> None:
    assert code == value


# --- the double scan ---------------------------------------------------------------------------------------------

STORED = DoseOnFile(
    dose_id="d-1",
    coupon_line=LINE,
    dose_number=1,
    vaccinated_on=date(2021, 6, 1),
    vaccine="pfizer",
    lot_number="EY0583",
)


SCAN = DoseFacts(coupon_line=LINE, dose_number=1, vaccinated_on=date(2021, 6, 1), vaccine="pfizer", lot_number="EY0583")


@pytest.mark.parametrize(
    ("dose", "duplicate"),
    [
        (SCAN, True),
        (replace(SCAN, lot_number="ey0583"), True),  # the same lot typed differently
        (replace(SCAN, lot_number="ＥＹ０５８３ "), True),
        (replace(SCAN, coupon_line="12011002" + "0000000001"), False),  # another sheet (dose digit) of the coupon
        (replace(SCAN, coupon_line="11011002" + "0000000002"), False),
        (replace(SCAN, dose_number=2), False),
        (replace(SCAN, vaccinated_on=date(2021, 6, 2)), False),
        (replace(SCAN, vaccine="moderna"), False),
        (replace(SCAN, lot_number="EY0584"), False),
        (replace(SCAN, lot_number=None), False),  # nothing to compare the lot with: not provably the same dose
    ],
)
def test_exact_duplicate(dose: DoseFacts, duplicate: bool) -> None:
    assert is_exact_duplicate(dose, STORED) is duplicate
    assert find_exact_duplicate(dose, [STORED]) == ("d-1" if duplicate else None)


def test_a_voided_dose_is_not_a_duplicate() -> None:
    voided = replace(STORED, dose_id="d-0", voided=True)
    assert find_exact_duplicate(SCAN, [voided]) is None
    assert find_exact_duplicate(SCAN, [voided, STORED]) == "d-1"


def test_the_first_duplicate_wins() -> None:
    later = replace(STORED, dose_id="d-2")
    assert find_exact_duplicate(SCAN, [STORED, later]) == "d-1"
    assert find_exact_duplicate(SCAN, []) is None
