"""What ingest decides about a dose: rejections, review findings, and the resulting status."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from shared.domain.coupon import CouponLine
from shared.domain.dose_rules import (
    DoseFacts,
    DoseRejected,
    DoseStatus,
    EarlierDose,
    Finding,
    FindingCode,
    check_admissible,
    decide_status,
    review_findings,
)
from shared.domain.vaccines import VaccineRules, default_rules

RULES: VaccineRules = default_rules()
TODAY = date(2024, 1, 10)
SAPPORO = "011002"


def line(dose_digit: int = 1, *, kind: int = 1, municipality: str = SAPPORO, number: str = "0000000001") -> str:
    return f"{kind}{dose_digit}{municipality}{number}"


def facts(
    dose_number: int = 1,
    vaccinated_on: date = date(2021, 6, 1),
    vaccine: str = "pfizer",
    *,
    coupon_line: str | None = None,
) -> DoseFacts:
    return DoseFacts(
        coupon_line=line(dose_number) if coupon_line is None else coupon_line,
        dose_number=dose_number,
        vaccinated_on=vaccinated_on,
        vaccine=vaccine,
    )


def codes(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


def findings_for(dose: DoseFacts, earlier: list[EarlierDose]) -> list[str]:
    coupon = check_admissible(dose, today=TODAY, rules=RULES)
    return codes(review_findings(dose, coupon, earlier, rules=RULES))


# --- check_admissible --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dose",
    [
        facts(),
        facts(vaccinated_on=RULES.program_start),  # first day of the programme
        facts(vaccinated_on=TODAY),
        facts(2, vaccine="moderna"),
        facts(3, date(2022, 3, 1), "astrazeneca"),
        facts(RULES.max_dose_number, date(2023, 10, 1), "novavax", coupon_line=line(0)),
    ],
)
def test_admissible(dose: DoseFacts) -> None:
    coupon = check_admissible(dose, today=TODAY, rules=RULES)
    assert isinstance(coupon, CouponLine)
    assert str(coupon) == dose.coupon_line


@pytest.mark.parametrize(
    ("dose", "field"),
    [
        (facts(coupon_line=""), "coupon"),
        (facts(coupon_line=line()[:-1]), "coupon"),
        (facts(coupon_line=line(municipality="011003")), "coupon"),  # bad check digit
        (facts(coupon_line=line(municipality="000000")), "coupon"),
        (facts(coupon_line=line(number="0000000000")), "coupon"),
        (facts(coupon_line=line(municipality="000000", number="0000000000")), "coupon"),
        (facts(coupon_line="１１０１１００２００００００００１"), "coupon"),
        (facts(0, coupon_line=line(0)), "dose_number"),
        (facts(-1, coupon_line=line(1)), "dose_number"),
        (facts(RULES.max_dose_number + 1, date(2023, 10, 1), coupon_line=line(0)), "dose_number"),
        (facts(vaccinated_on=TODAY + timedelta(days=1)), "vaccinated_on"),  # the future
        (facts(vaccinated_on=date(2031, 6, 1)), "vaccinated_on"),
        (facts(vaccinated_on=RULES.program_start - timedelta(days=1)), "vaccinated_on"),  # before 2021-02-17
        (facts(vaccinated_on=date(1921, 6, 1)), "vaccinated_on"),
        (facts(vaccine="sinovac"), "vaccine"),
        (facts(vaccine="Pfizer"), "vaccine"),
        (facts(vaccine="ファイザー"), "vaccine"),  # the label is not the product code
        (facts(vaccine=""), "vaccine"),
    ],
)
def test_rejected(dose: DoseFacts, field: str) -> None:
    with pytest.raises(DoseRejected) as exc_info:
        check_admissible(dose, today=TODAY, rules=RULES)
    assert exc_info.value.field == field
    assert str(exc_info.value).startswith(f"{field}: ")
    assert exc_info.value.message


def test_rejection_is_a_value_error() -> None:
    assert issubclass(DoseRejected, ValueError)


# --- review_findings ---------------------------------------------------------------------------------------------


def d(dose_number: int, on: date, vaccine: str = "pfizer") -> EarlierDose:
    return EarlierDose(dose_number=dose_number, vaccinated_on=on, vaccine=vaccine)


@pytest.mark.parametrize(
    ("dose", "earlier", "expected"),
    [
        # Nothing wrong.
        (facts(1), [], []),
        (facts(2, date(2021, 6, 22)), [d(1, date(2021, 6, 1))], []),
        # The dose digit printed on the coupon.
        (facts(2, date(2021, 6, 22), coupon_line=line(1)), [d(1, date(2021, 6, 1))], ["coupon_dose_mismatch"]),
        (facts(1, coupon_line=line(2)), [], ["coupon_dose_mismatch"]),
        (facts(1, coupon_line=line(0)), [], []),  # 0 carries no dose number
        (facts(3, date(2022, 3, 1), coupon_line=line(0)), [d(2, date(2021, 7, 1))], []),
        # The same dose number twice.
        (facts(1), [d(1, date(2021, 6, 1))], ["duplicate_dose"]),
        (facts(1), [d(1, date(2021, 5, 1))], ["duplicate_dose"]),
        # Dose 1 dated after dose 2, from either side.
        (facts(2, date(2021, 6, 1)), [d(1, date(2021, 6, 22))], ["dose_order"]),
        (facts(1, date(2021, 6, 22)), [d(2, date(2021, 6, 1))], ["dose_order"]),
        (facts(3, date(2022, 3, 1)), [d(1, date(2022, 4, 1)), d(2, date(2021, 7, 1))], ["dose_order"]),
        # Several findings at once.
        (
            facts(2, date(2021, 6, 1), coupon_line=line(1)),
            [d(1, date(2021, 6, 22)), d(2, date(2021, 7, 1))],
            ["coupon_dose_mismatch", "dose_order", "duplicate_dose"],
        ),
    ],
)
def test_review_findings(dose: DoseFacts, earlier: list[EarlierDose], expected: list[str]) -> None:
    assert sorted(findings_for(dose, earlier)) == sorted(expected)


@pytest.mark.parametrize(
    ("vaccine", "gap_days", "expected"),
    [
        ("pfizer", 0, ["interval_too_short"]),
        ("pfizer", 17, ["interval_too_short"]),
        ("pfizer", 18, []),  # day 19 counting dose 1 as day 1
        ("pfizer", 21, []),
        ("moderna", 27, ["interval_too_short"]),
        ("moderna", 28, []),
        ("astrazeneca", 27, ["interval_too_short"]),
        ("astrazeneca", 28, []),
        ("novavax", 20, ["interval_too_short"]),
        ("novavax", 21, []),
    ],
)
def test_primary_series_interval(vaccine: str, gap_days: int, expected: list[str]) -> None:
    first = date(2021, 6, 1)
    dose = facts(2, first + timedelta(days=gap_days), vaccine)
    assert findings_for(dose, [d(1, first, vaccine)]) == expected


@pytest.mark.parametrize(
    ("previous", "booster", "expected"),
    [
        # Before boosters began (2021-12-01): held to the first rule, 8 months.
        (date(2021, 6, 1), date(2021, 11, 30), ["interval_too_short"]),
        (date(2021, 3, 15), date(2021, 11, 15), []),
        (date(2021, 3, 16), date(2021, 11, 15), ["interval_too_short"]),
        # 8 months in December 2021.
        (date(2021, 5, 1), date(2021, 12, 31), ["interval_too_short"]),
        (date(2021, 4, 1), date(2021, 12, 1), []),
        (date(2021, 4, 2), date(2021, 12, 1), ["interval_too_short"]),
        # The same previous dose: too early under December's 8 months, fine under January's 7.
        (date(2021, 5, 1), date(2022, 1, 1), []),
        (date(2021, 6, 2), date(2022, 1, 1), ["interval_too_short"]),
        (date(2021, 6, 1), date(2022, 1, 1), []),
        # 7 months throughout 2022.
        (date(2022, 6, 1), date(2022, 12, 31), ["interval_too_short"]),
        (date(2022, 5, 31), date(2022, 12, 31), []),
        # 3 months from 2023: what was too early on 2022-12-31 is fine on 2023-01-01.
        (date(2022, 6, 1), date(2023, 1, 1), []),
        (date(2022, 12, 15), date(2023, 3, 14), ["interval_too_short"]),
        (date(2022, 12, 15), date(2023, 3, 15), []),
        (date(2022, 11, 30), date(2023, 2, 28), []),  # 3 months from 30 November, clamped
        (date(2022, 11, 30), date(2023, 2, 27), ["interval_too_short"]),
    ],
)
def test_booster_interval_by_the_rule_in_force(previous: date, booster: date, expected: list[str]) -> None:
    dose = facts(3, booster, "moderna")
    assert findings_for(dose, [d(1, date(2021, 3, 1)), d(2, previous)]) == expected


# Doses are entered days late and not always in order: a dose recorded before the one after it on file is held to
# the same interval, from its side.
_JUNE_10 = date(2021, 6, 10)


@pytest.mark.parametrize(
    ("dose", "earlier", "expected"),
    [
        # Dose 1 entered after dose 2 (pfizer: at least 18 days).
        (facts(1, _JUNE_10 - timedelta(days=5)), [d(2, _JUNE_10)], ["interval_too_short"]),
        (facts(1, _JUNE_10 - timedelta(days=17)), [d(2, _JUNE_10)], ["interval_too_short"]),
        (facts(1, _JUNE_10 - timedelta(days=18)), [d(2, _JUNE_10)], []),
        # Judged by dose 1's product, as in order.
        (facts(1, _JUNE_10 - timedelta(days=27), "moderna"), [d(2, _JUNE_10, "moderna")], ["interval_too_short"]),
        (facts(1, _JUNE_10 - timedelta(days=28), "moderna"), [d(2, _JUNE_10, "moderna")], []),
        (
            facts(1, _JUNE_10 - timedelta(days=85), "astrazeneca"),
            [d(2, _JUNE_10, "astrazeneca")],
            ["interval_too_long"],
        ),
        (facts(1, _JUNE_10 - timedelta(days=84), "astrazeneca"), [d(2, _JUNE_10, "astrazeneca")], []),
        # Dose 2 entered after the booster (7 months throughout 2022), its own interval from dose 1 fine.
        (
            facts(2, date(2022, 6, 1)),
            [d(1, date(2022, 5, 1)), d(3, date(2022, 12, 31), "moderna")],
            ["interval_too_short"],
        ),
        (facts(2, date(2022, 5, 31)), [d(1, date(2022, 5, 1)), d(3, date(2022, 12, 31), "moderna")], []),
        # Both sides at once: too soon after dose 1 and too soon before dose 3.
        (
            facts(2, date(2022, 6, 1)),
            [d(1, date(2022, 5, 20)), d(3, date(2022, 12, 31), "moderna")],
            ["interval_too_short", "interval_too_short"],
        ),
    ],
)
def test_interval_to_the_dose_after_on_file(dose: DoseFacts, earlier: list[EarlierDose], expected: list[str]) -> None:
    assert findings_for(dose, earlier) == expected


def test_interval_to_the_dose_after_says_which_dose_it_is() -> None:
    dose = facts(1, date(2021, 6, 5))
    coupon = check_admissible(dose, today=TODAY, rules=RULES)
    [finding] = review_findings(dose, coupon, [d(2, _JUNE_10)], rules=RULES)
    assert (
        finding.detail
        == "dose 2 on file (2021-06-10): 5 days after dose 1 of pfizer on 2021-06-05; the rule is at least 18"
    )


def test_booster_interval_is_measured_from_the_dose_just_before() -> None:
    earlier = [d(1, date(2021, 3, 1)), d(2, date(2021, 3, 22)), d(3, date(2022, 6, 1))]
    assert findings_for(facts(4, date(2022, 12, 1), "moderna"), earlier) == ["interval_too_short"]
    assert findings_for(facts(4, date(2023, 1, 1), "moderna"), earlier) == []


def test_findings_carry_a_message() -> None:
    dose = facts(2, date(2021, 6, 18), coupon_line=line(1))
    coupon = check_admissible(dose, today=TODAY, rules=RULES)
    findings = review_findings(dose, coupon, [d(1, date(2021, 6, 1))], rules=RULES)
    assert codes(findings) == ["coupon_dose_mismatch", "interval_too_short"]
    assert all(f.message and f.detail for f in findings)
    assert "17 days" in findings[1].detail


# --- decide_status -----------------------------------------------------------------------------------------------

FINDING = Finding(FindingCode.DOSE_ORDER, "dose 1 on 2021-06-22 is after dose 2")


@pytest.mark.parametrize(
    ("findings", "matched", "status"),
    [
        ([FINDING], True, DoseStatus.NEEDS_REVIEW),
        ([FINDING], False, DoseStatus.NEEDS_REVIEW),
        ([FINDING, Finding(FindingCode.DUPLICATE_DOSE, "x")], True, DoseStatus.NEEDS_REVIEW),
        ([], True, DoseStatus.RECORDED),
        ([], False, DoseStatus.UNMATCHED),
    ],
)
def test_decide_status(findings: list[Finding], matched: bool, status: DoseStatus) -> None:
    assert decide_status(findings, matched=matched) is status


@pytest.mark.parametrize(
    ("status", "value"),
    [(DoseStatus.RECORDED, "recorded"), (DoseStatus.NEEDS_REVIEW, "needs_review"), (DoseStatus.UNMATCHED, "unmatched")],
)
def test_status_values(status: DoseStatus, value: str) -> None:
    assert status == value
