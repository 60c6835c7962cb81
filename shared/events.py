"""The versioned event schemas: ``coupon-events`` (registry → records) and ``dose-events`` (records → stats).

Both are keyed by the issuing municipality's code, so each municipality's events keep their order.

**Coupon events** carry the coupon's whole new state and a version that grows with every change of that
coupon, so a consumer keeps the newest state it has seen: a repeat or an older event changes nothing.
They say who holds the coupon only as far as records needs it for the statistics cell (resident id, sex,
birth date) — never a name, address or My Number.

**Dose events**: an event carries the statistics cell the dose now counts in (``cell``) and the one it counted in before
(``previous_cell``), so a consumer applies any event as ``-previous_cell, +cell`` without state of its own.
Fields are only ever added with a default (``StatsCell.age_band_10``): an older event still decodes, and a
consumer that predates a field ignores it.
Never a name, a birth date, a My Number, a coupon number or a resident id: stats must not see them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.domain.age import AgeBand, AgeBand10
from shared.domain.dose_rules import CouponInvalidReason
from shared.domain.sex import Sex

__all__ = ["CouponInvalidReason"]  # re-exported: part of the coupon event's contract


class CouponEventType(StrEnum):
    ISSUED = "coupon.issued"  # the coupon was issued to a resident (or re-issued to the same one)
    HOLDER_CHANGED = "coupon.holder_changed"  # the holder's sex or birth date changed
    INVALIDATED = "coupon.invalidated"  # stopped being valid: reason and date in the state (invalid_from)


class CouponState(BaseModel):
    model_config = ConfigDict(frozen=True)

    resident_id: str  # the municipality's own person id (個別宛名番号); opaque to records
    sex: Sex
    birth_date: date | None
    # The date the coupon stopped being valid, read according to ``invalid_reason`` (CouponValidity in
    # shared/domain/dose_rules.py): for ``reissued`` and ``voided`` the first day it is no longer valid (the day
    # the new number was issued, the day it was withdrawn); for ``moved_out`` the moving day (転出日), which is
    # still the coupon's last valid day — a dose that day is the old municipality's, only later ones are not.
    # None while the coupon is valid.
    invalid_from: date | None = None
    invalid_reason: CouponInvalidReason | None = None


class Event(BaseModel):
    """What every event has: an id, a schema version, when it happened, and the issuing municipality, which
    is its partition key."""

    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = 1
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    municipality: str = Field(pattern=r"^\d{6}$")

    @property
    def key(self) -> str:
        return self.municipality

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        return cls.model_validate_json(raw)


class CouponEvent(Event):
    type: CouponEventType
    coupon_number: str = Field(pattern=r"^\d{10}$")
    version: int = Field(ge=1)  # of this coupon's state; newer wins
    state: CouponState


# Events a message may carry: a batch's events of one key travel as one outbox row and one message holding a
# JSON array (a dose event is ~400 bytes, so a message stays well under Kafka's 1 MB limit).
EVENTS_PER_MESSAGE = 1000
_E = TypeVar("_E", bound=Event)


def _events_from_bytes(raw: bytes, model: type[_E], many: TypeAdapter[list[_E]]) -> list[_E]:
    """One event (a JSON object) or several (a JSON array); each keeps its own id, so a consumer that counts
    each id once is unchanged."""
    if raw.lstrip()[:1] == b"[":
        return many.validate_json(raw)
    return [model.from_bytes(raw)]


_COUPON_EVENTS = TypeAdapter(list[CouponEvent])


def coupon_events_from_bytes(raw: bytes) -> list[CouponEvent]:
    """The events of one ``coupon-events`` message: a bulk import writes the coupons it issues by the thousand,
    one outbox row and one message per thousand."""
    return _events_from_bytes(raw, CouponEvent, _COUPON_EVENTS)


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
    sex: Sex
    age_band: AgeBand
    # Added to schema version 1 compatibly: an event written before it decodes as unknown, which is also
    # what records stored for the doses it already had, so a later correction takes back what was added.
    age_band_10: AgeBand10 = AgeBand10.UNKNOWN
    medical_worker: bool
    dose_number: int = Field(ge=1)
    vaccine: str


class DoseEvent(Event):
    type: DoseEventType
    dose_id: uuid.UUID  # opaque record id; lets a consumer trace, never identifies a person
    cell: StatsCell | None  # None once voided
    previous_cell: StatsCell | None  # None for a new dose


_DOSE_EVENTS = TypeAdapter(list[DoseEvent])


def dose_events_from_bytes(raw: bytes) -> list[DoseEvent]:
    """The events of one ``dose-events`` message: a dose batch's events of one municipality travel together
    (see :func:`shared.outbox.outbox_rows`), a single dose's alone."""
    return _events_from_bytes(raw, DoseEvent, _DOSE_EVENTS)
