"""A Kafka group member knows how long it has waited for the group's assignment: from its join, or from losing
its partitions, until kafka-python hands it the next assignment (an empty one included)."""

from __future__ import annotations

from shared.bus.kafka import KafkaSource
from shared.settings import BusSettings


def test_a_member_waits_from_losing_its_partitions_until_the_next_assignment() -> None:
    source = KafkaSource(BusSettings(kind="kafka"), consumer="test")
    assert source.rebalancing_for() is None  # not in a group: never waiting
    source._revoked({0, 1})
    first = source.rebalancing_for()
    assert first is not None and first >= 0
    source._revoked({2})  # a second revoke in the same rebalance does not restart the clock
    again = source.rebalancing_for()
    assert again is not None and again >= first
    source._assigned(set())  # nothing assigned is an assignment too: the rebalance is over
    assert source.rebalancing_for() is None
    assert source.take_assignment() is not None
