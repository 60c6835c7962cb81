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


# What records accepts in one certificate check; registry splits a larger question (certificates.py).
MAX_DOSE_VERSION_GRANT = 500_000  # characters of the signed grant
MAX_DOSE_VERSION_IDS = 50_000


class DoseVersionsIn(BaseModel):
    """registry → records on a certificate check: a dose-version grant, and the dose ids asked about (each
    must be named in the grant)."""

    grant: str = Field(min_length=1, max_length=MAX_DOSE_VERSION_GRANT)
    dose_ids: list[str] = Field(min_length=1, max_length=MAX_DOSE_VERSION_IDS)


class DoseVersion(BaseModel):
    """Where a certified dose stands now: enough to tell whether a card still shows it, nothing about anyone."""

    dose_id: str
    version: int
    status: DoseStatus
    voided: bool


class DoseVersionList(BaseModel):
    doses: list[DoseVersion]  # a dose id records does not hold (in the municipality the grant names) is absent
