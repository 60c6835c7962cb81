from __future__ import annotations

from datetime import date

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.db import UtcDatetime
from shared.domain.codes import my_number_problem
from shared.domain.coupon import coupon_number_problem
from shared.domain.sex import Sex
from shared.schemas import DoseSummary


class ResidentIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=100)
    name_kana: str = Field(min_length=1, max_length=200)
    birth_date: date | None = None
    sex: Sex
    my_number: str | None = Field(default=None, repr=False)
    address: str | None = Field(default=None, max_length=300)
    coupon_number: str | None = None

    @field_validator("my_number")
    @classmethod
    def _my_number(cls, value: str | None) -> str | None:
        # The message never contains the number itself.
        if value is not None and (problem := my_number_problem(value)):
            raise ValueError(f"My Number {problem}")
        return value

    @field_validator("coupon_number")
    @classmethod
    def _coupon_number(cls, value: str | None) -> str | None:
        if value is not None and (problem := coupon_number_problem(value)):
            raise ValueError(f"coupon number {problem}")
        return value

    @field_validator("birth_date")
    @classmethod
    def _birth_date(cls, value: date | None) -> date | None:
        if value is not None and value > date.today():
            raise ValueError("birth date is in the future")
        return value


class ResidentOut(BaseModel):
    municipality: str
    resident_id: str
    name: str
    name_kana: str
    birth_date: date | None
    sex: Sex
    my_number: str | None = Field(description="masked: only the last four digits are shown")
    address: str | None
    coupon_number: str | None
    moved_to: str | None
    moved_on: date | None
    created_at: UtcDatetime
    updated_at: UtcDatetime


class ResidentWithDoses(ResidentOut):
    doses: list[DoseSummary]


class ImportAccepted(BaseModel):
    import_id: str


class ImportRowError(BaseModel):
    row: int = Field(description="the file's row; the header is row 1, so the first resident is row 2")
    field: str
    message: str


class ImportStatus(BaseModel):
    import_id: str
    status: str = Field(description="running or done")
    rows_total: int = Field(description="data rows read so far (all of them once done)")
    rows_ok: int
    rows_failed: int
    errors: list[ImportRowError]
    errors_more: bool = Field(description="more errors follow: ask again with errors_after_row")
    bytes_total: int
    bytes_done: int
    created_at: datetime
    finished_at: datetime | None
