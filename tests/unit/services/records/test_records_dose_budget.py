"""records' coupon consumer bounds each transaction's locked doses by count and by the time they have been
taking (:class:`services.records.consumer.DoseBudget`)."""

from __future__ import annotations

import pytest

from services.records.consumer import MIN_BATCH_DOSES, DoseBudget


@pytest.mark.parametrize(
    ("per_dose", "bound"),
    [
        (None, 500),  # nothing measured yet: a quarter of the count
        (0.25 / 2000, 2000),  # exactly the count's worth of time
        (0.25 / 1999, 1999),  # a little slower: a little fewer
        (0.0001, 2000),  # faster than the count allows: the count still bounds
        (0.0005, 500),  # a host 2.5 times slower than 0.0002 s a dose
        (0.25 / MIN_BATCH_DOSES, MIN_BATCH_DOSES),
        (1.0, MIN_BATCH_DOSES),  # never below the floor, however slow a moment was
    ],
)
def test_the_bound_is_the_count_or_the_doses_that_fit_the_seconds(per_dose: float | None, bound: int) -> None:
    assert DoseBudget(max_doses=2000, seconds=0.25, per_dose=per_dose).bound() == bound


@pytest.mark.parametrize("per_dose", [None, 1.0])
def test_the_count_bounds_below_the_floor_too(per_dose: float | None) -> None:
    budget = DoseBudget(max_doses=MIN_BATCH_DOSES // 2, seconds=0.25, per_dose=per_dose)
    assert budget.bound() == MIN_BATCH_DOSES // 2


def test_before_anything_is_measured_the_floor_holds() -> None:
    assert DoseBudget(max_doses=2 * MIN_BATCH_DOSES, seconds=0.25).bound() == MIN_BATCH_DOSES


def test_each_measured_transaction_moves_the_estimate_part_of_the_way() -> None:
    budget = DoseBudget(max_doses=2000, seconds=0.25)
    budget.observe(1000, 0.5)
    assert budget.per_dose == pytest.approx(0.0005)
    budget.observe(1000, 0.2)
    assert budget.per_dose == pytest.approx(0.7 * 0.0005 + 0.3 * 0.0002)


@pytest.mark.parametrize("doses", [0, 1, MIN_BATCH_DOSES // 2 - 1])
def test_a_transaction_of_a_few_doses_is_not_taken_for_their_cost(doses: int) -> None:
    budget = DoseBudget(max_doses=2000, seconds=0.25)
    budget.observe(doses, 0.5)  # e.g. thousands of coupons announced by a bulk import, a few doses among them
    assert budget.per_dose is None and budget.bound() == 500
    budget.observe(MIN_BATCH_DOSES // 2, 0.5)
    assert budget.per_dose == pytest.approx(0.5 / (MIN_BATCH_DOSES // 2))
