"""Builders shared by tests: one place that knows what a typical statistics cell and dose event look like."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

from shared.domain.age import AgeBand
from shared.events import DoseEvent, DoseEventType, StatsCell


def cell(**changes: Any) -> StatsCell:
    """A cell of 千代田区 on 2021-06-01 (female, under 65, dose 1, Pfizer), with ``changes`` applied."""
    fields: dict[str, Any] = {
        "date": date(2021, 6, 1),
        "prefecture": "13",
        "municipality": "131016",
        "sex": "F",
        "age_band": AgeBand.UNDER_65,
        "medical_worker": False,
        "dose_number": 1,
        "vaccine": "pfizer",
    }
    fields.update(changes)
    return StatsCell(**fields)


def recorded(new: StatsCell | None = None, **changes: Any) -> DoseEvent:
    new = new or cell(**changes)
    return DoseEvent(
        type=DoseEventType.RECORDED, dose_id=uuid.uuid4(), municipality=new.municipality, cell=new, previous_cell=None
    )
