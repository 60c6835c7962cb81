"""The state a dose's history keeps before each change is what its issuing municipality reads of it (the
API's ``DoseOut``, as JSON) and its statistics cell — built from the columns without validating the findings
again, it must stay exactly that."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest

from services.records.models import Dose
from services.records.service import _snapshot, to_out

FINDINGS = [
    {"code": "interval_too_short", "message": "the interval is too short", "detail": "dose 1 on 2021-05-01"},
    {"code": "lot_number_format", "message": "the lot number is not in the product's format", "detail": None},
]


def stored(**changes: Any) -> Dose:
    columns: dict[str, Any] = {
        "dose_id": "0b0c8a52-5a44-4c4f-9d34-0cf4f1f0b5a1",
        "municipality_code": "131016",
        "coupon_number": "0000000001",
        "coupon_line": "1" * 18,
        "dose_number": 2,
        "vaccinated_on": date(2021, 6, 1),
        "vaccine": "pfizer",
        "lot_number": "EY0583",
        "venue": "千代田区役所",
        "doctor": None,
        "medical_worker": True,
        "status": "needs_review",
        "findings": FINDINGS,
        "rules_version": "2021.1",
        "resident_id": "A0001",
        "sex": "F",
        "age_band": "65+",
        "age_band_10": "70-79",
        "voided": False,
        "version": 3,
        "recorded_by": "institution:1312345678",
        "recorded_at": datetime(2021, 6, 1, 9, tzinfo=UTC),
        "updated_at": datetime(2021, 6, 2, 9, tzinfo=UTC),
    }
    return Dose(**(columns | changes))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"findings": [], "status": "recorded"},
        {"resident_id": None, "sex": "U", "age_band": "unknown", "age_band_10": "unknown", "status": "unmatched"},
        {"voided": True, "venue": None, "doctor": "佐藤", "medical_worker": False},
        {"findings": [{"code": "duplicate_dose", "message": "dose 2 is on file"}]},  # stored before "detail" was
    ],
)
def test_the_snapshot_is_the_municipalitys_view_and_the_cell(changes: dict[str, Any]) -> None:
    dose = stored(**changes)
    expected = to_out(dose).model_dump(mode="json") | {
        "sex": dose.sex,
        "age_band": dose.age_band,
        "age_band_10": dose.age_band_10,
    }
    assert _snapshot(dose) == expected
    assert list(_snapshot(dose)) == list(expected)  # the same keys in the same order: the same JSON text
