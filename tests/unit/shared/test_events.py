"""A coupon-events or dose-events message is one event or a JSON array of them (a bulk import's, a dose
batch's), each with its own id."""

from __future__ import annotations

import uuid
from datetime import date

import pytest
from pydantic import ValidationError

from shared.events import (
    CouponEvent,
    CouponEventType,
    CouponState,
    DoseEvent,
    DoseEventType,
    coupon_events_from_bytes,
    dose_events_from_bytes,
)


def event(number: str) -> CouponEvent:
    state = CouponState(resident_id="R1", sex="F", birth_date=date(1950, 4, 1))
    return CouponEvent(type=CouponEventType.ISSUED, municipality="131016", coupon_number=number, version=1, state=state)


def test_one_event_or_an_array() -> None:
    one, two = event("0000000001"), event("0000000002")
    assert coupon_events_from_bytes(one.to_bytes()) == [one]
    assert coupon_events_from_bytes(b"[" + one.to_bytes() + b"," + two.to_bytes() + b"]") == [one, two]
    assert coupon_events_from_bytes(b"[]") == []


def test_an_unreadable_message_is_a_validation_error() -> None:
    for raw in (b"[{}]", b"{}", b"[1,2]"):
        with pytest.raises(ValidationError):
            coupon_events_from_bytes(raw)


def dose_event() -> DoseEvent:
    return DoseEvent(
        type=DoseEventType.VOIDED, dose_id=uuid.uuid4(), municipality="131016", cell=None, previous_cell=None
    )


def test_a_dose_message_is_one_event_or_an_array() -> None:
    one, two = dose_event(), dose_event()
    assert dose_events_from_bytes(one.to_bytes()) == [one]
    assert dose_events_from_bytes(b" [" + one.to_bytes() + b"," + two.to_bytes() + b"]") == [one, two]
    for raw in (b"[{}]", b"{}", b"[1,2]", b"[" + one.to_bytes()):
        with pytest.raises(ValidationError):
            dose_events_from_bytes(raw)
