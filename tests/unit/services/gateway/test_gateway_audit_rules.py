"""What goes into an audit entry: no My Number, ever, and one canonical form for its hash."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.gateway.audit import DEFAULT_PURPOSE, canonical, chain_hash, purpose_text, redact_my_numbers
from shared.domain.codes import my_number_check_digit


def my_number(first_eleven: str) -> str:
    return first_eleven + str(my_number_check_digit(first_eleven))


MY_NUMBER = my_number("12345678901")
NOT_A_MY_NUMBER = MY_NUMBER[:11] + str((int(MY_NUMBER[11]) + 1) % 10)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MY_NUMBER, "********" + MY_NUMBER[-4:]),
        (f"lookup {MY_NUMBER} please", f"lookup ********{MY_NUMBER[-4:]} please"),
        (f"{MY_NUMBER[:4]} {MY_NUMBER[4:8]} {MY_NUMBER[8:]}", "********" + MY_NUMBER[-4:]),
        (f"{MY_NUMBER[:4]}-{MY_NUMBER[4:8]}-{MY_NUMBER[8:]}", "********" + MY_NUMBER[-4:]),
        (f"r-{MY_NUMBER}", f"r-********{MY_NUMBER[-4:]}"),
        # A twelve-digit id whose check digit fails cannot be a My Number: kept, so the audit stays exact.
        (NOT_A_MY_NUMBER, NOT_A_MY_NUMBER),
        ("1" + MY_NUMBER, "1" + MY_NUMBER),  # thirteen digits
        ("consent", "consent"),
        ("", ""),
    ],
)
def test_redact_my_numbers(text: str, expected: str) -> None:
    assert redact_my_numbers(text) == expected


@pytest.mark.parametrize(
    ("stated", "expected"),
    [
        ("consent", "consent"),
        ("  my-number-act-19-16 ", "my-number-act-19-16"),
        (None, DEFAULT_PURPOSE),
        ("", DEFAULT_PURPOSE),
        ("   ", DEFAULT_PURPOSE),
        (42, DEFAULT_PURPOSE),
        (["consent"], DEFAULT_PURPOSE),
        ("x" * 500, "x" * 100),
        (f"checking {MY_NUMBER}", f"checking ********{MY_NUMBER[-4:]}"),
    ],
)
def test_purpose_text(stated: object, expected: str) -> None:
    assert purpose_text(stated) == expected


FIELDS = {
    "seq": 7,
    "recorded_at": datetime(2026, 11, 24, 1, 2, 3, 456789, tzinfo=UTC),
    "request_id": "req-1",
    "subject": "131016",
    "role": "municipality",
    "municipality": "131016",
    "institution": None,
    "method": "GET",
    "path_template": "/api/v1/municipalities/{code}/residents/{resident_id}",
    "resource_ids": '{"code":"131016","resident_id":"r-1"}',
    "purpose": "administration",
    "status": 200,
}


def test_canonical_form_is_the_same_however_the_database_returns_the_time() -> None:
    naive_utc = {**FIELDS, "recorded_at": datetime(2026, 11, 24, 1, 2, 3, 456789)}
    in_tokyo = {**FIELDS, "recorded_at": FIELDS["recorded_at"].astimezone(timezone(timedelta(hours=9)))}  # type: ignore[attr-defined]
    extra = {**FIELDS, "prev_hash": "x", "entry_hash": "y", "id": 1}
    assert canonical(naive_utc) == canonical(FIELDS) == canonical(in_tokyo) == canonical(extra)
    assert canonical(FIELDS).startswith(b'{"institution":null,"method":"GET",')
    assert b'"recorded_at":"2026-11-24T01:02:03.456789Z"' in canonical(FIELDS)


def test_every_field_and_the_previous_hash_change_the_hash() -> None:
    base = chain_hash("0" * 64, FIELDS)
    assert chain_hash("1" + "0" * 63, FIELDS) != base
    changed = {"seq": 8, "request_id": "req-2", "subject": "x", "role": "national", "municipality": None,
               "institution": "1312345678", "method": "PUT", "path_template": "/dashboard", "resource_ids": "{}",
               "purpose": "consent", "status": 404, "recorded_at": datetime(2026, 11, 24, tzinfo=UTC)}  # fmt: skip
    for name, value in changed.items():
        assert chain_hash("0" * 64, {**FIELDS, name: value}) != base, name
