"""What ingest decides about a dose, before anything is written.

Two kinds of outcome, so that the errors the real VRS found months late are caught at the tablet:
- a :class:`DoseRejected` for what cannot be true (bad coupon line, a date in the future or before the
  programme began, an unknown product): the tablet must re-read or re-enter;
- :class:`Finding` s for what may be true but needs a person (the coupon is for another dose, dose 1
  after dose 2, an interval shorter than the rule in force): the dose is kept as ``needs_review``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from shared.domain.coupon import CouponLine, CouponLineError, parse_coupon_line
from shared.domain.vaccines import VaccineRules, add_months


class DoseStatus(StrEnum):
    RECORDED = "recorded"
    NEEDS_REVIEW = "needs_review"
    UNMATCHED = "unmatched"  # no registered resident holds the coupon (yet)


class DoseRejected(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Finding:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class DoseFacts:
    coupon_line: str
    dose_number: int
    vaccinated_on: date
    vaccine: str


@dataclass(frozen=True, slots=True)
class EarlierDose:
    """A dose already on file for the same coupon (same person), not voided."""

    dose_number: int
    vaccinated_on: date
    vaccine: str


def check_admissible(facts: DoseFacts, *, today: date, rules: VaccineRules) -> CouponLine:
    """Raise :class:`DoseRejected` for a dose that cannot be true; return the parsed coupon line."""
    try:
        coupon = parse_coupon_line(facts.coupon_line)
    except CouponLineError as exc:
        raise DoseRejected("coupon", str(exc)) from None
    if not 1 <= facts.dose_number <= rules.max_dose_number:
        raise DoseRejected("dose_number", f"must be between 1 and {rules.max_dose_number}")
    if facts.vaccinated_on > today:
        raise DoseRejected("vaccinated_on", f"{facts.vaccinated_on} is in the future")
    if facts.vaccinated_on < rules.program_start:
        raise DoseRejected(
            "vaccinated_on", f"{facts.vaccinated_on} is before vaccination began ({rules.program_start})"
        )
    if facts.vaccine not in rules.products:
        known = ", ".join(sorted(rules.products))
        raise DoseRejected("vaccine", f"unknown product code '{facts.vaccine}' (known: {known})")
    return coupon


def review_findings(
    facts: DoseFacts, coupon: CouponLine, earlier: Sequence[EarlierDose], *, rules: VaccineRules
) -> list[Finding]:
    """Findings that send a dose to review; empty when nothing looks wrong."""
    findings: list[Finding] = []
    # 回数 printed on the coupon: 0 carries no dose number, so only a non-zero digit can disagree.
    if coupon.dose_number and coupon.dose_number != facts.dose_number:
        findings.append(
            Finding(
                "coupon_dose_mismatch",
                f"coupon is for dose {coupon.dose_number}, record says dose {facts.dose_number}",
            )
        )
    for other in earlier:
        if other.dose_number == facts.dose_number:
            findings.append(
                Finding("duplicate_dose", f"dose {facts.dose_number} is already recorded on {other.vaccinated_on}")
            )
        elif other.dose_number < facts.dose_number and other.vaccinated_on > facts.vaccinated_on:
            findings.append(
                Finding(
                    "dose_order",
                    f"dose {other.dose_number} on {other.vaccinated_on} is after dose {facts.dose_number}",
                )
            )
        elif other.dose_number > facts.dose_number and other.vaccinated_on < facts.vaccinated_on:
            findings.append(
                Finding(
                    "dose_order",
                    f"dose {other.dose_number} on {other.vaccinated_on} is before dose {facts.dose_number}",
                )
            )
    previous = [d for d in earlier if d.dose_number == facts.dose_number - 1]
    if previous:
        findings.extend(_interval_findings(facts, previous[0], rules))
    return findings


def _interval_findings(facts: DoseFacts, previous: EarlierDose, rules: VaccineRules) -> list[Finding]:
    gap = (facts.vaccinated_on - previous.vaccinated_on).days
    if gap < 0:
        return []  # already reported as dose_order
    if facts.dose_number == 2:
        product = rules.products.get(previous.vaccine)
        if product and gap < product.primary_min_days:
            return [
                Finding(
                    "interval_too_short",
                    f"{gap} days after dose 1 of {product.code}; the rule is at least {product.primary_min_days}",
                )
            ]
        return []
    months = rules.booster_min_months(facts.vaccinated_on)
    if months is not None and facts.vaccinated_on < add_months(previous.vaccinated_on, months):
        return [
            Finding(
                "interval_too_short",
                f"booster {gap} days after dose {previous.dose_number}; the rule on "
                f"{facts.vaccinated_on} is at least {months} months",
            )
        ]
    return []


def decide_status(findings: Sequence[Finding], *, matched: bool) -> DoseStatus:
    if findings:
        return DoseStatus.NEEDS_REVIEW
    return DoseStatus.RECORDED if matched else DoseStatus.UNMATCHED
