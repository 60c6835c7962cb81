"""Bulk random UUIDs are version-4 UUIDs like uuid4()'s, and distinct."""

import uuid

from shared.ids import random_uuids


def test_random_uuids_are_distinct_version_4_rfc_4122_ids() -> None:
    ids = random_uuids(2000)
    assert len(set(ids)) == 2000
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in ids)
    assert all(uuid.UUID(str(u)) == u for u in ids[:10])
    assert random_uuids(0) == []
