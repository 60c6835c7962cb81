"""A batch's events go into the outbox as one row (one bus message) per key, a JSON array in their order."""

from __future__ import annotations

import uuid

from shared.events import DoseEvent, DoseEventType, dose_events_from_bytes
from shared.outbox import outbox_row, outbox_rows


def event(municipality: str) -> DoseEvent:
    return DoseEvent(
        type=DoseEventType.VOIDED, dose_id=uuid.uuid4(), municipality=municipality, cell=None, previous_cell=None
    )


def test_one_row_per_key_each_event_kept_in_order_and_a_lone_event_as_itself() -> None:
    events = [event("131016"), event("011002"), event("131016"), event("131016"), event("271004")]
    rows = outbox_rows(events)
    assert [row["key"] for row in rows] == ["131016", "011002", "271004"]
    assert dose_events_from_bytes(rows[0]["payload"]) == [events[0], events[2], events[3]]
    assert rows[1] == outbox_row(events[1]) and rows[2] == outbox_row(events[4])  # a single object, as before
    assert rows[0]["event_id"] not in {str(e.event_id) for e in events}  # the row's own id, unique in the table
    assert rows[0]["created_at"] == events[0].occurred_at


def test_many_events_of_one_key_are_cut_into_rows_of_at_most_per_row() -> None:
    events = [event("131016") for _ in range(7)]
    rows = outbox_rows(events, per_row=3)
    assert [len(dose_events_from_bytes(row["payload"])) for row in rows] == [3, 3, 1]
    assert [e for row in rows for e in dose_events_from_bytes(row["payload"])] == events
    assert outbox_rows([]) == []
