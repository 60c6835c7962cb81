"""Shapes that two services exchange, defined once (records answers with them, registry reads them)."""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel, Field

from shared.domain.dose_rules import DoseStatus


class DoseSummary(BaseModel):
    """A dose as registry shows it beside a resident (records' internal read, on the caller's behalf)."""

    dose_id: str
    municipality: str
    coupon_number: str
    dose_number: int
    vaccinated_on: date
    vaccine: str
    lot_number: str
    status: DoseStatus
    venue: str | None = None  # 接種会場名: a certificate shows it as the performer
    voided: bool
    version: int  # changes with every correction: a certificate showing an older version is stale


class DoseSummaryList(BaseModel):
    doses: list[DoseSummary]


class TransferDosesIn(BaseModel):
    """registry → records on a transfer lookup: one signed grant per municipality the person lived in."""

    grants: list[str] = Field(min_length=1, max_length=1000)
