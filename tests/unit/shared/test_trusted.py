"""``built`` makes what ``model_construct`` makes, for every model the dose path builds with it."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from services.records.schemas import BatchItemResult, DoseAccepted, FindingOut
from shared.domain.age import AgeBand, AgeBand10
from shared.domain.sex import Sex
from shared.events import DoseEvent, DoseEventType, StatsCell
from shared.trusted import built

CELL: dict[str, Any] = {
    "date": date(2021, 6, 1),
    "prefecture": "13",
    "municipality": "131016",
    "sex": Sex("F"),
    "age_band": AgeBand("65-"),
    "age_band_10": AgeBand10("70-79"),
    "medical_worker": False,
    "dose_number": 2,
    "vaccine": "pfizer",
}
FINDINGS = [FindingOut(code="interval_too_short", message="the interval is shorter than the product's")]
EVENT: dict[str, Any] = {
    "schema_version": 1,
    "event_id": uuid.uuid4(),
    "occurred_at": datetime(2021, 6, 1, 3, 4, 5, tzinfo=UTC),
    "municipality": "131016",
    "type": DoseEventType.RECORDED,
    "dose_id": uuid.uuid4(),
    "cell": built(StatsCell, **CELL),
    "previous_cell": None,
}
CASES = [
    pytest.param(StatsCell, CELL, id="cell"),
    pytest.param(DoseEvent, EVENT, id="event"),
    pytest.param(DoseAccepted, {"dose_id": "d1", "status": "needs_review", "findings": FINDINGS}, id="answer"),
    pytest.param(
        BatchItemResult,
        {"client_id": "c1", "dose_id": "d1", "status": "recorded", "findings": [], "error": None},
        id="batch-item",
    ),
]


@pytest.mark.parametrize(("model", "values"), CASES)
def test_built_is_what_model_construct_makes(model: type[BaseModel], values: dict[str, Any]) -> None:
    mine, theirs = built(model, **values), model.model_construct(**values)
    assert type(mine) is model
    assert mine == theirs
    assert mine.model_fields_set == theirs.model_fields_set
    assert mine.model_dump_json() == theirs.model_dump_json()
    assert mine.model_dump() == theirs.model_dump()
    # What it holds is valid: validating its JSON gives it back.
    assert model.model_validate_json(mine.model_dump_json()) == mine


def test_a_built_event_stays_frozen_and_travels_as_any_event() -> None:
    event = built(DoseEvent, **EVENT)
    with pytest.raises(ValidationError):
        event.municipality = "011002"  # type: ignore[misc]
    assert DoseEvent.from_bytes(event.to_bytes()) == DoseEvent.model_validate(EVENT)


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({k: v for k, v in EVENT.items() if k != "cell"}, id="a field missing"),
        pytest.param(EVENT | {"coupon_number": "0000000001"}, id="a field of no such name"),
    ],
)
def test_every_field_and_no_other(values: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="DoseEvent is built from every field and no other"):
        built(DoseEvent, **values)
