"""The 18-digit line printed on a vaccination coupon (接種券), MHLW 接種実施の手引き v13.1 p.130.

| 券種 kind (1) | 回数 dose (1) | 市町村コード municipality (6, check digit) | 券番号 coupon number (10) |
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from shared.domain.codes import municipality_code_problem, prefecture_of

COUPON_LINE_LENGTH = 18
COUPON_NUMBER_LENGTH = 10


class CouponLineError(ValueError):
    """The line cannot be a coupon; ``str(err)`` says why in words a tablet user can act on."""


@dataclass(frozen=True, slots=True)
class CouponLine:
    kind: int  # 券種 (values unconfirmed, kept as printed)
    dose_number: int  # 回数: which dose this coupon is for
    municipality_code: str  # 市町村コード of the issuing municipality
    coupon_number: str  # 券番号, unique within the municipality

    @property
    def prefecture(self) -> str:
        return prefecture_of(self.municipality_code)

    def __str__(self) -> str:
        return f"{self.kind}{self.dose_number}{self.municipality_code}{self.coupon_number}"


def parse_coupon_line(line: str) -> CouponLine:
    if len(line) != COUPON_LINE_LENGTH or not line.isascii() or not line.isdigit():
        raise CouponLineError(f"must be exactly {COUPON_LINE_LENGTH} digits")
    municipality_code = line[2:8]
    problem = municipality_code_problem(municipality_code)
    if problem:
        raise CouponLineError(f"municipality code {municipality_code} {problem}")
    coupon_number = line[8:]
    if coupon_number == "0" * 10:
        raise CouponLineError("coupon number 0000000000 is never issued")
    return CouponLine(
        kind=int(line[0]),
        dose_number=int(line[1]),
        municipality_code=municipality_code,
        coupon_number=coupon_number,
    )


def coupon_number_problem(number: str) -> str | None:
    if len(number) != COUPON_NUMBER_LENGTH or not number.isascii() or not number.isdigit():
        return "must be exactly 10 digits"
    if number == "0" * 10:
        return "0000000000 is never issued"
    return None


def compose_coupon_line(*, kind: int, dose_number: int, municipality_code: str, coupon_number: str) -> str:
    """The 18-digit line to print: the inverse of :func:`parse_coupon_line`.

    ``dose_number`` is the 回数 digit, 0..9 (0: the coupon is not tied to one dose); a later dose than 9
    cannot be printed and is refused rather than truncated. Raises :class:`CouponLineError`.
    """
    if not 0 <= kind <= 9:
        raise CouponLineError(f"coupon kind {kind} is not one digit")
    if not 0 <= dose_number <= 9:
        raise CouponLineError(f"dose number {dose_number} is not one digit")
    if problem := municipality_code_problem(municipality_code):
        raise CouponLineError(f"municipality code {municipality_code} {problem}")
    if problem := coupon_number_problem(coupon_number):
        raise CouponLineError(f"coupon number {problem}")
    return str(CouponLine(kind, dose_number, municipality_code, coupon_number))


def candidate_coupon_numbers(randbelow: Callable[[int], int]) -> Iterator[str]:
    """Endless random 10-digit coupon numbers (never 0000000000) for a new coupon.

    ``randbelow(n)`` returns a uniform integer in ``[0, n)``: ``secrets.randbelow`` in production (an
    unguessable number cannot be enumerated by a reservation site), ``random.Random(seed).randrange`` in
    tests. Uniqueness is the database's job: take the next candidate when the insert collides.
    """
    while True:
        number = randbelow(10**COUPON_NUMBER_LENGTH - 1) + 1
        yield f"{number:0{COUPON_NUMBER_LENGTH}d}"
