"""The 18-digit line printed on a vaccination coupon (接種券), MHLW 接種実施の手引き v13.1 p.130.

| 券種 kind (1) | 回数 dose (1) | 市町村コード municipality (6, check digit) | 券番号 coupon number (10) |
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.domain.codes import municipality_code_problem, prefecture_of

COUPON_LINE_LENGTH = 18


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
    if len(number) != 10 or not number.isascii() or not number.isdigit():
        return "must be exactly 10 digits"
    if number == "0" * 10:
        return "0000000000 is never issued"
    return None
