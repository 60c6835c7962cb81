from __future__ import annotations

from pydantic import BaseModel, Field

from shared.db import UtcDatetime

# A row's values: date (YYYY-MM-DD), codes and bands as strings, medical_worker a bool, numbers as ints.
RowValue = str | int | bool


class DosesOut(BaseModel):
    as_of: UtcDatetime | None = Field(
        description="when the aggregates last changed (the last applied event batch); null before the first"
    )
    rows: list[dict[str, RowValue | None]] = Field(
        description="one object per group: the group_by keys in the order asked, then count; sorted by the keys. "
        "count is null where a fine cut hides a small count (callers other than role national)"
    )
    next_offset: int | None = Field(
        default=None, description="present when more rows follow: pass it as offset for the next page"
    )
    suppressed: int | None = Field(
        default=None, description="present on suppressed cuts: how many rows of this page have their count hidden"
    )


class CoverageRow(BaseModel):
    prefecture: str | None = Field(description="2-digit prefecture code; null for the nation")
    population: int = Field(description="the denominator: 住民基本台帳 population on 2021-01-01, sum of the age bands")
    population_65_and_over: int
    dose_number: int = Field(description="N in 'people with at least dose N'")
    count: int = Field(description="people with a live dose N (corrected and voided doses taken out)")
    count_65_and_over: int = Field(description="of them, aged 65 or over on the day of that dose")
    rate: float = Field(description="count / population, a fraction 0-1")
    rate_65_and_over: float = Field(description="count_65_and_over / population_65_and_over, a fraction 0-1")


class CoverageOut(BaseModel):
    as_of: UtcDatetime | None = Field(description="when the aggregates last changed; null before the first event")
    rows: list[CoverageRow] = Field(
        description="per prefecture (when asked) and dose number, doses 1 and 2 always, higher ones once given"
    )
