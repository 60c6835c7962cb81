from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

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


@dataclass(frozen=True, slots=True)
class InvalidBatchItem:
    """A batch item with a valid ``client_id`` whose other fields do not validate: answered ``rejected`` with
    each field's error, while the batch's other items are recorded."""

    client_id: str
    errors: tuple[tuple[str, str], ...]  # (the field within the item, why)


_BATCH_DOSE = TypeAdapter(BatchDoseIn)


def _item_or_invalid(value: Any) -> BatchDoseIn | InvalidBatchItem:
    try:
        return _BATCH_DOSE.validate_python(value)
    except ValidationError as exc:
        errors = exc.errors()
        # Without a client_id there is nothing to key the item's result by (and a retry could not be matched to
        # it): the whole batch is refused, naming the item.
        if not isinstance(value, dict) or any(e["loc"][:1] == ("client_id",) for e in errors):
            raise
        return InvalidBatchItem(
            client_id=value["client_id"].strip(),
            errors=tuple((".".join(str(p) for p in e["loc"]) or "item", e["msg"]) for e in errors),
        )


# Documented as a BatchDoseIn: what a valid item is. An invalid one is rejected on its own (InvalidBatchItem).
BatchItem = Annotated[
    BatchDoseIn | InvalidBatchItem,
    PlainValidator(_item_or_invalid),
    WithJsonSchema(BatchDoseIn.model_json_schema()),
]


class DoseBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    doses: list[BatchItem] = Field(min_length=1, max_length=1000)

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
    status: Literal["running", "done"] = Field(description="as a resident import's: running until every row is done")
    phase: Literal["queued", "processing", "done"] = Field(
        description="running's detail: queued (no row read yet) or processing"
    )
    rows_total: int = Field(description="data rows in the file (0 until processing starts)")
    rows_ok: int = Field(description="rows recorded (or answered as before: a row sent again is not a new dose)")
    rows_failed: int
    errors: list[DoseImportRowError] = Field(description="the first 1,000 row errors, in file order")
