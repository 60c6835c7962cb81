"""Builders shared by tests: one place that knows what a typical statistics cell and dose event look like."""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from shared.domain.age import AgeBand
from shared.events import DoseEvent, DoseEventType, StatsCell

# The stats tests' ``add_cells`` fixture: change counts as the consumer would.
AddCells = Callable[[Mapping[StatsCell, int]], Awaitable[None]]


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


def team_data(relative: str) -> Path:
    """A file of the team folder's ``data/`` (``VRS_SHARED_DATA``, default ``../shared/data``), read in place.

    Absent in a plain clone: the test is skipped. Always present on CI: there its absence fails the test.
    """
    override = os.environ.get("VRS_SHARED_DATA")
    root = Path(override) if override else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    path = root / relative
    if not path.is_file():
        reason = f"{path} not found (set VRS_SHARED_DATA to the team folder's data/)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true: every test must run", pytrace=False)
        pytest.skip(reason)
    return path
