from __future__ import annotations

from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.domain.dose_rules import DoseStatus


class DoseIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    coupon: str = Field(description="the 18-digit line printed on the coupon (接種券)")
    dose_number: int = Field(description="接種回数")
    vaccinated_on: date = Field(description="接種日 (YYYY-MM-DD)")
    vaccine: str = Field(description="product code: pfizer, moderna, astrazeneca, novavax")
    lot_number: str = Field(min_length=1, max_length=20)
    venue: str | None = Field(default=None, max_length=30)
    doctor: str | None = Field(default=None, max_length=20)
    medical_worker: bool = Field(default=False, description="the vaccinated person is a medical worker (医療従事者等)")


class BatchDoseIn(DoseIn):
    client_id: str = Field(min_length=1, max_length=100, description="the tablet's id of this item; retries reuse it")


class DoseBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    doses: list[BatchDoseIn] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _unique_client_ids(self) -> DoseBatchIn:
        seen: set[str] = set()
        for i, dose in enumerate(self.doses):
            if dose.client_id in seen:
                raise ValueError(f"doses[{i}].client_id '{dose.client_id}' appears twice")
            seen.add(dose.client_id)
        return self


class FindingOut(BaseModel):
    code: str = Field(description="the rule, e.g. duplicate_dose, dose_order, interval_too_short, coupon_not_valid")
    message: str = Field(description="what the rule says, without another record's dates or products")
    detail: str | None = Field(
        default=None, description="the specifics; only for the municipality that issued the coupon"
    )


class DoseAccepted(BaseModel):
    dose_id: str = Field(description="for a duplicate: the dose first recorded")
    status: Literal["recorded", "needs_review", "unmatched", "duplicate"]
    findings: list[FindingOut]


class ItemError(BaseModel):
    error: str
    detail: str
    errors: list[dict[str, str]] = []


class BatchItemResult(BaseModel):
    client_id: str
    dose_id: str | None = None
    status: Literal["recorded", "needs_review", "unmatched", "duplicate", "rejected"]
    findings: list[FindingOut] = []
    error: ItemError | None = None


class DoseBatchOut(BaseModel):
    results: list[BatchItemResult]


class DoseOut(BaseModel):
    dose_id: str
    municipality: str
    coupon_number: str
    dose_number: int
    vaccinated_on: date
    vaccine: str
    lot_number: str
    venue: str | None
    doctor: str | None
    medical_worker: bool
    status: DoseStatus
    findings: list[FindingOut]
    matched: bool
    voided: bool
    version: int


class DoseList(BaseModel):
    doses: list[DoseOut]


class CorrectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    changes: dict[str, Any] | None = None
    void: bool = False
    reason: str = Field(min_length=1, max_length=500)

    @model_validator(mode="after")
    def _one_of(self) -> CorrectionIn:
        if self.void == bool(self.changes):
            raise ValueError("give either 'changes' or 'void': true")
        return self


class CouponStatusOut(BaseModel):
    """What a tablet may learn of a coupon before it records a dose: no person, only the coupon."""

    coupon: str = Field(description="the 18-digit line as given")
    registered: bool = Field(description="records knows the resident who holds it (doses will be matched)")
    valid: bool = Field(description="not reissued, moved out or voided as of today")


class ImportAccepted(BaseModel):
    import_id: str


class DoseImportRowError(BaseModel):
    row: int = Field(description="the file's row number (the header is row 1)")
    field: str
    message: str


class DoseImportStatusOut(BaseModel):
    status: Literal["queued", "processing", "done", "failed"]
    rows_total: int = Field(description="data rows in the file (0 until processing starts)")
    rows_ok: int = Field(description="rows recorded (or answered as before: a row sent again is not a new dose)")
    rows_failed: int
    errors: list[DoseImportRowError] = Field(description="the first 1,000 row errors, in file order")
