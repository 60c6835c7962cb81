"""A dose's request hash is compared with hashes stored by earlier versions: its text must never change."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from services.records.schemas import BatchDoseIn, DoseIn
from services.records.service import request_hash

DOSE: dict[str, Any] = {
    "coupon": "1" * 18,
    "dose_number": 2,
    "vaccinated_on": "2021-06-01",
    "vaccine": "pfizer",
    "lot_number": "EY0583",
    "venue": "千代田区役所",
    "doctor": None,
    "medical_worker": True,
}


def test_the_hash_of_a_dose_is_the_one_stored_before() -> None:
    # Computed by the first version (json.dumps with sort_keys, compact separators, ASCII escapes).
    assert request_hash(DoseIn.model_validate(DOSE)) == (
        "dc6feeff1510716e7d71c5e4e76f69ce9dc67a3f21ff26d92f8c191c35494442"
    )


@pytest.mark.parametrize(
    "changes",
    [{}, {"venue": None}, {"doctor": 'Dr. 山田 "quoted"'}, {"lot_number": " EY0583 "}, {"medical_worker": False}],
)
def test_the_hash_is_the_sorted_compact_json_of_the_dose(changes: dict[str, Any]) -> None:
    dose = DoseIn.model_validate(DOSE | changes)
    text = json.dumps(dose.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert request_hash(dose) == hashlib.sha256(text.encode()).hexdigest()


def test_a_batch_item_hashes_as_the_same_dose_sent_alone() -> None:
    item = BatchDoseIn.model_validate(DOSE | {"client_id": "tablet-1"})
    assert request_hash(item) == request_hash(DoseIn.model_validate(DOSE))
