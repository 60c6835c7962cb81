"""What ingest decides about a dose, before anything is written.

Two kinds of outcome, so that the errors the real VRS found months late are caught at the tablet:
- a :class:`DoseRejected` for what cannot be true (bad coupon line, a dose number outside 1..10, a date in
  the future or before the programme began, an unknown product): the tablet must re-read or re-enter;
- :class:`Finding` s for what may be true but needs a person (the coupon is for another dose, dose 1
  after dose 2, an interval outside the rule in force, a lot that does not look like the product's, a
  coupon no longer valid): the dose is kept as ``needs_review``.

A finding about other records of the same person must not tell a caller who is not the issuing
municipality anything about those records (any institution may record a dose for any coupon, so findings
would otherwise let it probe a person's history). Each finding therefore has a stable ``code``, a generic
``message`` safe for anyone, and a ``detail`` (dates, products) for the issuing municipality's review.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum

from shared.domain.coupon import CouponLine, CouponLineError, parse_coupon_line
from shared.domain.vaccines import VaccineRules, add_months, normalise_lot


class DoseStatus(StrEnum):
    RECORDED = "recorded"
    NEEDS_REVIEW = "needs_review"
    UNMATCHED = "unmatched"  # no registered resident holds the coupon (yet)


class DoseRejected(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class FindingCode(StrEnum):
    COUPON_DOSE_MISMATCH = "coupon_dose_mismatch"
    DUPLICATE_DOSE = "duplicate_dose"
    DOSE_ORDER = "dose_order"
    INTERVAL_TOO_SHORT = "interval_too_short"
    INTERVAL_TOO_LONG = "interval_too_long"
    LOT_FORMAT = "lot_format"
    COUPON_NOT_VALID = "coupon_not_valid"


# Safe for any caller: they name the rule, never another record's date, product or dose number.
FINDING_MESSAGES: dict[FindingCode, str] = {
    FindingCode.COUPON_DOSE_MISMATCH: "the dose number printed on the coupon differs from the recorded dose number",
    FindingCode.DUPLICATE_DOSE: "another dose of this coupon has the same dose number",
    FindingCode.DOSE_ORDER: "another dose of this coupon conflicts with this one's order",
    FindingCode.INTERVAL_TOO_SHORT: (
        "the interval between this dose and the one before or after it is shorter than the rule allows"
    ),
    FindingCode.INTERVAL_TOO_LONG: (
        "the interval between this dose and the one before or after it is longer than the product allows"
    ),
    FindingCode.LOT_FORMAT: "the lot number does not have the product's lot number format",
    FindingCode.COUPON_NOT_VALID: "the coupon was no longer valid on the vaccination date",
}


@dataclass(frozen=True, slots=True)
class Finding:
    code: FindingCode
    detail: str  # the specifics (other doses' dates and products): for the issuing municipality only

    @property
    def message(self) -> str:
        return FINDING_MESSAGES[self.code]

    def as_dict(self, *, with_detail: bool) -> dict[str, str]:
        """The finding as a caller may see it: ``with_detail`` only for the issuing municipality."""
        shown = {"code": self.code.value, "message": self.message}
        return shown | {"detail": self.detail} if with_detail else shown


@dataclass(frozen=True, slots=True)
class DoseFacts:
    coupon_line: str
    dose_number: int
    vaccinated_on: date
    vaccine: str
    lot_number: str | None = None  # None: the lot format is not checked


@dataclass(frozen=True, slots=True)
class EarlierDose:
    """A dose already on file for the same coupon (same person), not voided."""

    dose_number: int
    vaccinated_on: date
    vaccine: str


class CouponInvalidReason(StrEnum):
    REISSUED = "reissued"  # lost coupon: a new number replaces it
    MOVED_OUT = "moved_out"  # 転出
    VOIDED = "voided"


@dataclass(frozen=True, slots=True)
class CouponValidity:
    """A coupon that stopped being valid: ``valid_until`` is its last valid day (inclusive)."""

    valid_until: date
    reason: CouponInvalidReason

    @classmethod
    def no_longer_valid_from(cls, first_invalid_day: date, reason: CouponInvalidReason) -> CouponValidity:
        return cls(valid_until=first_invalid_day - timedelta(days=1), reason=reason)

    @classmethod
    def moved_out(cls, moved_on: date) -> CouponValidity:
        # A dose on the moving day itself is still the old municipality's: only later ones need review.
        return cls(valid_until=moved_on, reason=CouponInvalidReason.MOVED_OUT)

    @classmethod
    def reissued(cls, reissued_on: date) -> CouponValidity:
        # The old number is invalid from the day the new one is issued.
        return cls.no_longer_valid_from(reissued_on, CouponInvalidReason.REISSUED)

    @classmethod
    def voided(cls, voided_on: date) -> CouponValidity:
        return cls.no_longer_valid_from(voided_on, CouponInvalidReason.VOIDED)


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
    facts: DoseFacts,
    coupon: CouponLine,
    earlier: Sequence[EarlierDose],
    *,
    rules: VaccineRules,
    validity: CouponValidity | None = None,
) -> list[Finding]:
    """Findings that send a dose to review; empty when nothing looks wrong.

    ``validity`` is the coupon's end of validity when it has one (None: still valid).
    """
    findings: list[Finding] = []
    # 回数 printed on the coupon: 0 carries no dose number, so only a non-zero digit can disagree.
    if coupon.dose_number and coupon.dose_number != facts.dose_number:
        findings.append(
            Finding(
                FindingCode.COUPON_DOSE_MISMATCH,
                f"coupon is for dose {coupon.dose_number}, record says dose {facts.dose_number}",
            )
        )
    findings.extend(_lot_findings(facts, rules))
    findings.extend(coupon_validity_findings(facts.vaccinated_on, validity))
    findings.extend(_history_findings(facts, earlier))
    this = EarlierDose(facts.dose_number, facts.vaccinated_on, facts.vaccine)
    previous = [d for d in earlier if d.dose_number == facts.dose_number - 1]
    if previous:
        findings.extend(_interval_findings(this, previous[0], rules))
    # Doses are entered days late and not always in order: the dose after this one may be on file already,
    # and the interval between the two is as wrong whichever of them came second.
    following = [d for d in earlier if d.dose_number == facts.dose_number + 1]
    if following:
        findings.extend(_interval_findings(following[0], this, rules, later_on_file=True))
    return findings


def _lot_findings(facts: DoseFacts, rules: VaccineRules) -> list[Finding]:
    product = rules.products.get(facts.vaccine)
    if facts.lot_number is None or product is None or product.lot_matches(facts.lot_number):
        return []
    return [
        Finding(
            FindingCode.LOT_FORMAT,
            f"lot '{normalise_lot(facts.lot_number)}' does not match {product.code}'s format "
            f"({product.lot_pattern.pattern if product.lot_pattern else ''})",
        )
    ]


def coupon_validity_findings(vaccinated_on: date, validity: CouponValidity | None) -> list[Finding]:
    """coupon_not_valid when a dose given on ``vaccinated_on`` is dated after the coupon's validity ended."""
    if validity is None or vaccinated_on <= validity.valid_until:
        return []
    return [
        Finding(
            FindingCode.COUPON_NOT_VALID,
            f"coupon valid until {validity.valid_until} ({validity.reason.value}), dose dated {vaccinated_on}",
        )
    ]


def _history_findings(facts: DoseFacts, earlier: Sequence[EarlierDose]) -> list[Finding]:
    findings: list[Finding] = []
    for other in earlier:
        if other.dose_number == facts.dose_number:
            findings.append(
                Finding(
                    FindingCode.DUPLICATE_DOSE,
                    f"dose {facts.dose_number} is already recorded on {other.vaccinated_on}",
                )
            )
        elif other.dose_number < facts.dose_number and other.vaccinated_on > facts.vaccinated_on:
            findings.append(
                Finding(
                    FindingCode.DOSE_ORDER,
                    f"dose {other.dose_number} on {other.vaccinated_on} is after dose {facts.dose_number}",
                )
            )
        elif other.dose_number > facts.dose_number and other.vaccinated_on < facts.vaccinated_on:
            findings.append(
                Finding(
                    FindingCode.DOSE_ORDER,
                    f"dose {other.dose_number} on {other.vaccinated_on} is before dose {facts.dose_number}",
                )
            )
    return findings


def _interval_findings(
    later: EarlierDose, previous: EarlierDose, rules: VaccineRules, *, later_on_file: bool = False
) -> list[Finding]:
    """The interval from ``previous`` to ``later`` (dose numbers n-1 and n) against the rule in force. One of
    them is the dose being decided: ``later``, or ``previous`` when ``later_on_file`` (then the detail says
    which dose on file it is measured to)."""
    gap = (later.vaccinated_on - previous.vaccinated_on).days
    if gap < 0:
        return []  # already reported as dose_order
    found = (
        _primary_interval_findings(gap, previous, rules)
        if later.dose_number == 2
        else _booster_interval_findings(gap, later, previous, rules)
    )
    if later_on_file:
        found = [
            Finding(f.code, f"dose {later.dose_number} on file ({later.vaccinated_on}): {f.detail}") for f in found
        ]
    return found


def _booster_interval_findings(
    gap: int, later: EarlierDose, previous: EarlierDose, rules: VaccineRules
) -> list[Finding]:
    general = rules.booster_min_months(later.vaccinated_on)
    product = rules.products.get(later.vaccine)
    own = product.booster_min_months if product else None
    # The stricter of the rule in force on the booster's date and the booster product's own minimum.
    months = max((m for m in (general, own) if m is not None), default=None)
    if months is not None and later.vaccinated_on < add_months(previous.vaccinated_on, months):
        return [
            Finding(
                FindingCode.INTERVAL_TOO_SHORT,
                f"booster of {later.vaccine} {gap} days after dose {previous.dose_number} on "
                f"{previous.vaccinated_on}; the rule on {later.vaccinated_on} is at least {months} months",
            )
        ]
    return []


def _primary_interval_findings(gap: int, previous: EarlierDose, rules: VaccineRules) -> list[Finding]:
    # The primary series is judged by the product of dose 1, which fixed the schedule.
    product = rules.products.get(previous.vaccine)
    if product is None:
        return []
    if gap < product.primary_min_days:
        return [
            Finding(
                FindingCode.INTERVAL_TOO_SHORT,
                f"{gap} days after dose 1 of {product.code} on {previous.vaccinated_on}; "
                f"the rule is at least {product.primary_min_days}",
            )
        ]
    if product.primary_max_days is not None and gap > product.primary_max_days:
        return [
            Finding(
                FindingCode.INTERVAL_TOO_LONG,
                f"{gap} days after dose 1 of {product.code} on {previous.vaccinated_on}; "
                f"the rule is at most {product.primary_max_days}",
            )
        ]
    return []


def decide_status(findings: Sequence[Finding], *, matched: bool) -> DoseStatus:
    if findings:
        return DoseStatus.NEEDS_REVIEW
    return DoseStatus.RECORDED if matched else DoseStatus.UNMATCHED


@dataclass(frozen=True, slots=True)
class DoseOnFile:
    """A stored dose, as the double-scan check compares it."""

    dose_id: str
    coupon_line: str
    dose_number: int
    vaccinated_on: date
    vaccine: str
    lot_number: str
    voided: bool = False


def is_exact_duplicate(facts: DoseFacts, stored: DoseOnFile) -> bool:
    """The same coupon line, dose number, date, product and lot: the same dose scanned twice.

    Venue, doctor and the medical-worker flag do not count: a second scan at another desk is still the
    same dose. Lots compare normalised (full-width or lower-case typing is the same lot). A voided dose
    is no longer on file, so recording it again is a new dose.
    """
    return (
        not stored.voided
        and facts.lot_number is not None
        and stored.coupon_line == facts.coupon_line
        and stored.dose_number == facts.dose_number
        and stored.vaccinated_on == facts.vaccinated_on
        and stored.vaccine == facts.vaccine
        and normalise_lot(stored.lot_number) == normalise_lot(facts.lot_number)
    )


def find_exact_duplicate(facts: DoseFacts, on_file: Iterable[DoseOnFile]) -> str | None:
    """The id of the first dose in ``on_file`` (pass them oldest first) that ``facts`` duplicates exactly.

    A hit means the caller answers ``duplicate`` with that id and stores and counts nothing.
    """
    return next((stored.dose_id for stored in on_file if is_exact_duplicate(facts, stored)), None)
