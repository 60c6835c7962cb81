"""The versioned dose-event schema on topic ``dose-events`` (key: issuing municipality code).

An event carries the statistics cell the dose now counts in (``cell``) and the one it counted in before
(``previous_cell``), so a consumer applies any event as ``-previous_cell, +cell`` without state of its own.
Never a name, a birth date, a My Number, a coupon number or a resident id: stats must not see them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.domain.age import AgeBand


class DoseEventType(StrEnum):
    RECORDED = "dose.recorded"
    CORRECTED = "dose.corrected"
    VOIDED = "dose.voided"
    MATCHED = "dose.matched"  # an unmatched dose got its resident: U/UNK moves to the real cell


class StatsCell(BaseModel):
    """One cell of the aggregates: every dimension the open data and the dashboard cut by."""

    model_config = ConfigDict(frozen=True)

    date: date
    prefecture: str = Field(pattern=r"^\d{2}$")
    municipality: str = Field(pattern=r"^\d{6}$")
    sex: Literal["M", "F", "U"]
    age_band: AgeBand
    medical_worker: bool
    dose_number: int = Field(ge=1)
    vaccine: str


class DoseEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = 1
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: DoseEventType
    occurred_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    dose_id: uuid.UUID  # opaque record id; lets a consumer trace, never identifies a person
    municipality: str = Field(pattern=r"^\d{6}$")  # the partition key
    cell: StatsCell | None  # None once voided
    previous_cell: StatsCell | None  # None for a new dose

    @property
    def key(self) -> str:
        return self.municipality

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> DoseEvent:
        return cls.model_validate_json(raw)
