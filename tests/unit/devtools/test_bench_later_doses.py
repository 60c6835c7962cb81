"""The bench's batches of later doses: the first phase's coupons again, each time round the next dose, within
the rules' intervals, every item under a client id of its own — so every one is stored and counted."""

from __future__ import annotations

import json
from datetime import date
from typing import Any

from devtools.bench.core import PHASE_BATCH, LoadSpec
from services.records.schemas import DoseIn
from services.records.service import _facts
from shared.domain.dose_rules import EarlierDose, check_admissible, review_findings
from shared.domain.vaccines import default_rules


def spec(**changes: Any) -> LoadSpec:
    fields: dict[str, Any] = {
        "name": "later", "url": "http://x", "headers": {}, "kind": "batch", "concurrency": 1, "warmup": 0.0,
        "duration": 1.0, "phase": PHASE_BATCH, "tag": "t", "batch_size": 4,
    }  # fmt: skip
    return LoadSpec(**(fields | changes))


def doses(load: LoadSpec, b: int) -> list[dict[str, Any]]:
    return list(json.loads(load.batch_body(b))["doses"])


def test_later_batches_give_the_first_batches_coupons_their_next_doses() -> None:
    first, later = spec(tag="first"), spec(tag="later", coupon_batches=2)
    firsts = doses(first, 0) + doses(first, 1)
    seconds = doses(later, 0) + doses(later, 1)
    thirds = doses(later, 2) + doses(later, 3)
    coupons = [d["coupon"][2:] for d in firsts]  # municipality and coupon number (the line's digit 2 is the dose's)
    assert [d["coupon"][2:] for d in seconds] == [d["coupon"][2:] for d in thirds] == coupons
    assert {d["dose_number"] for d in firsts} == {1}
    assert {d["dose_number"] for d in seconds} == {2}
    assert {d["dose_number"] for d in thirds} == {3}
    ids = [d["client_id"] for d in seconds + thirds]
    assert len(set(ids)) == len(ids)


def test_each_later_dose_keeps_the_rules_intervals() -> None:
    rules = default_rules()
    first, later = spec(tag="first"), spec(tag="later", coupon_batches=1)
    for one, two, three in zip(doses(first, 0), doses(later, 0), doses(later, 1), strict=True):
        earlier: list[EarlierDose] = []
        for doc in (one, two, three):
            facts = _facts(DoseIn.model_validate({k: v for k, v in doc.items() if k != "client_id"}))
            coupon = check_admissible(facts, today=date(2026, 1, 1), rules=rules)
            assert review_findings(facts, coupon, earlier, rules=rules, validity=None) == []
            earlier.append(EarlierDose(facts.dose_number, facts.vaccinated_on, facts.vaccine))
