"""Bulk random UUIDs are version-4 UUIDs like uuid4()'s, and distinct."""

import uuid

from shared.ids import random_uuid_strings, random_uuids


def test_random_uuids_are_distinct_version_4_rfc_4122_ids() -> None:
    ids = random_uuids(2000)
    assert len(set(ids)) == 2000
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in ids)
    assert all(uuid.UUID(str(u)) == u for u in ids[:10])
    assert random_uuids(0) == []


def test_random_uuid_strings_are_distinct_version_4_rfc_4122_ids_as_str_writes_them() -> None:
    ids = random_uuid_strings(2000)
    assert len(set(ids)) == 2000
    parsed = [uuid.UUID(s) for s in ids]
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == s for u, s in zip(parsed, ids, strict=True))
    assert {s[19] for s in ids} == set("89ab")  # every variant digit occurs, nothing else
    assert random_uuid_strings(0) == []
