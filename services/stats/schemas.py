from __future__ import annotations

from pydantic import BaseModel, Field

from shared.db import UtcDatetime

# A row's values: date (YYYY-MM-DD), codes and bands as strings, medical_worker a bool, numbers as ints.
RowValue = str | int | bool


class DosesOut(BaseModel):
    as_of: UtcDatetime | None = Field(
        description="when the aggregates last changed (the last applied event batch); null before the first"
    )
    rows: list[dict[str, RowValue]] = Field(
        description="one object per group: the group_by keys in the order asked, then count; sorted by the keys"
    )
