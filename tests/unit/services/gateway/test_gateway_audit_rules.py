"""What goes into an audit entry: no My Number, a legal basis from the fixed list, one canonical form for its MAC;
what a cut's MAC covers, and how a chain still reaches its anchor after a cut."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.gateway.audit import (
    Anchor,
    AuditFacts,
    LegalBasis,
    _document,
    _prepare,
    anchor_holds,
    canonical,
    cut_is_genuine,
    cut_mac,
    entry_mac,
    legal_basis,
    redact_my_numbers,
)
from services.gateway.service import coupons_municipality
from services.gateway.settings import GatewaySettings
from shared.domain.codes import my_number_check_digit
from shared.domain.coupon import compose_coupon_line


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
        ("consent", LegalBasis.CONSENT),
        ("my-number-act-19-16", LegalBasis.MY_NUMBER_ACT_19_16),
        ("administration", LegalBasis.ADMINISTRATION),
        ("  consent ", None),  # the fixed list, spelled exactly
        ("because I wanted to", None),
        (f"checking {MY_NUMBER}", None),
        (None, None),
        (42, None),
        (["consent"], None),
    ],
)
def test_legal_basis_comes_from_a_fixed_list(stated: object, expected: LegalBasis | None) -> None:
    assert legal_basis(stated) is expected


KEY = b"k" * 32
FIELDS = {
    "instance": "gw-1",
    "seq": 7,
    "recorded_at": datetime(2026, 11, 24, 1, 2, 3, 456789, tzinfo=UTC),
    "request_id": "req-1",
    "principal": "131016",
    "role": "municipality",
    "caller_municipality": "131016",
    "institution": None,
    "municipality": "131016",
    "action": "GET /api/v1/municipalities/{code}/residents/{resident_id}",
    "resource": "/api/v1/municipalities/131016/residents/r-1",
    "legal_basis": "administration",
    "outcome": 200,
}


def test_canonical_form_is_the_same_however_the_database_returns_the_time() -> None:
    naive_utc = {**FIELDS, "recorded_at": datetime(2026, 11, 24, 1, 2, 3, 456789)}
    in_tokyo = {**FIELDS, "recorded_at": FIELDS["recorded_at"].astimezone(timezone(timedelta(hours=9)))}  # type: ignore[attr-defined]
    extra = {**FIELDS, "prev_mac": "x", "mac": "y", "id": 1}
    assert canonical(naive_utc) == canonical(FIELDS) == canonical(in_tokyo) == canonical(extra)
    assert canonical(FIELDS).startswith(b'{"action":"GET ')
    assert b'"recorded_at":"2026-11-24T01:02:03.456789Z"' in canonical(FIELDS)


def test_every_field_the_previous_mac_and_the_key_change_the_mac() -> None:
    base = entry_mac(KEY, "0" * 64, FIELDS)
    assert entry_mac(KEY, "1" + "0" * 63, FIELDS) != base
    assert entry_mac(b"j" * 32, "0" * 64, FIELDS) != base
    changed = {"instance": "gw-2", "seq": 8, "request_id": "req-2", "principal": "x", "role": "national",
               "caller_municipality": None, "institution": "1312345678", "municipality": None, "action": "PUT /x",
               "resource": "/dashboard", "legal_basis": "consent", "outcome": 404,
               "recorded_at": datetime(2026, 11, 24, tzinfo=UTC)}  # fmt: skip
    for name, value in changed.items():
        assert entry_mac(KEY, "0" * 64, {**FIELDS, name: value}) != base, name


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"outcome": None},  # an intent
        {"intent_seq": 41, "outcome": 201},  # an outcome entry
        {"caller_municipality": None, "institution": "1312345678", "municipality": None, "role": "institution"},
        {"resource": '/a "quoted" \\ back\tslash\u0001\u2028', "principal": "医療機関-テスト"},
        {"request_id": MY_NUMBER, "resource": f"/api/v1/municipalities/131016/residents/{MY_NUMBER}"},
        {"municipality": "1234567", "institution": "12"},  # not codes: stored as null
        {"principal": "a\x00b"},  # NUL: stored as U+FFFD
    ],
)
def test_the_writers_document_is_the_canonical_form(changes: dict[str, object]) -> None:
    """The PostgreSQL writer builds each entry's JSON from pieces prepared once per request; what it keys and
    stores must be exactly :func:`canonical` of the entry as stored, or ``vrs audit verify`` would fail it."""
    facts_fields = {k: v for k, v in {**FIELDS, **changes}.items() if k not in ("instance", "seq", "recorded_at")}
    facts = AuditFacts(**{**facts_fields, "legal_basis": LegalBasis(facts_fields["legal_basis"])})  # type: ignore[arg-type]
    redact: Callable[[str], str] = lambda text: redact_my_numbers(text).replace("\x00", "\ufffd")  # noqa: E731
    prepared = _prepare(facts, redact)
    stamp = "2026-11-24T01:02:03.456789Z"
    document = _document(prepared, json.dumps("gw-1"), facts.intent_seq, facts.outcome, f'"{stamp}"', 7)
    stored = {
        **FIELDS,
        **changes,
        "request_id": prepared.request_id,
        "principal": prepared.principal,
        "resource": prepared.resource,
        "caller_municipality": prepared.caller_municipality,
        "institution": prepared.institution,
        "municipality": prepared.municipality,
    }
    assert document + b"}" == canonical(stored)
    assert MY_NUMBER not in document.decode() and "\x00" not in document.decode()
    if "municipality" in changes and changes["municipality"] == "1234567":
        assert stored["municipality"] is None and stored["institution"] is None
    # The outcome entry of the same request shares the prepared pieces.
    outcome = facts.with_outcome(200, 41)
    assert outcome._prepared is prepared
    assert (outcome.outcome, outcome.intent_seq, outcome.request_id) == (200, 41, facts.request_id)


CUT = {
    "instance": "gw-1",
    "seq": 41,
    "mac": "a" * 64,
    "kept_since": datetime(2019, 11, 27, 15, tzinfo=UTC),
    "cut_at": datetime(2026, 11, 28, 4, 30, tzinfo=UTC),
}


def test_a_cuts_mac_covers_every_field_and_the_key() -> None:
    base = cut_mac(KEY, CUT)
    # As the database hands it back: naive UTC (SQLite) or in another zone (PostgreSQL's session zone).
    naive = {**CUT, "kept_since": datetime(2019, 11, 27, 15), "cut_at": datetime(2026, 11, 28, 4, 30)}
    assert cut_mac(KEY, naive) == base
    assert cut_is_genuine(KEY, {**CUT, "cut_mac": base})
    assert not cut_is_genuine(b"j" * 32, {**CUT, "cut_mac": base})
    changed = {"instance": "gw-2", "seq": 42, "mac": "b" * 64, "kept_since": CUT["cut_at"], "cut_at": CUT["kept_since"]}
    for name, value in changed.items():
        assert not cut_is_genuine(KEY, {**CUT, name: value, "cut_mac": base}), name


@pytest.mark.parametrize(
    ("anchor", "cut", "entry", "holds"),
    [
        (Anchor(7, "m7"), None, {"mac": "m7"}, True),  # the anchored entry, as anchored
        (Anchor(7, "m7"), None, {"mac": "x"}, False),  # changed
        (Anchor(7, "m7"), None, None, False),  # deleted
        (Anchor(7, "m7"), {"seq": 7, "mac": "m7"}, None, True),  # cut at the anchored entry
        (Anchor(7, "m7"), {"seq": 7, "mac": "x"}, None, False),  # cut there, but not the anchored entry
        (Anchor(7, "m7"), {"seq": 9, "mac": "m9"}, None, True),  # cut past it: an anchor a power cut left behind
        (Anchor(7, "m7"), {"seq": 6, "mac": "m6"}, {"mac": "m7"}, True),  # cut before it: the entry decides
        (Anchor(7, "m7"), {"seq": 6, "mac": "m6"}, None, False),
    ],
)
def test_a_chain_reaches_its_anchor_through_the_entry_or_its_cut(
    anchor: Anchor, cut: dict[str, object] | None, entry: dict[str, object] | None, holds: bool
) -> None:
    assert anchor_holds(anchor, cut, entry) is holds


def test_the_audit_trail_is_kept_seven_years_at_least() -> None:
    assert GatewaySettings().audit_keep_years == 7
    assert GatewaySettings(audit_keep_years=10).audit_keep_years == 10
    with pytest.raises(ValueError, match="audit_keep_years"):
        GatewaySettings(audit_keep_years=6)


def coupon(municipality: str, number: str = "0000000001") -> str:
    return compose_coupon_line(kind=1, dose_number=1, municipality_code=municipality, coupon_number=number)


CHIYODA, SAPPORO = "131016", "011002"


@pytest.mark.parametrize(
    ("body", "items", "whose"),
    [
        ({"coupon": coupon(CHIYODA)}, None, CHIYODA),
        ({"coupon": coupon(SAPPORO)}, None, SAPPORO),
        ({"coupon": coupon(CHIYODA)[:17]}, None, None),  # 17 digits: not a coupon
        ({"coupon": coupon(CHIYODA)[:7] + "7" + coupon(CHIYODA)[8:]}, None, None),  # the code's check digit fails
        ({"coupon": 131016}, None, None),
        ({}, None, None),
        ({"doses": [{"coupon": coupon(CHIYODA)}, {"coupon": coupon(CHIYODA, "0000000002")}]}, "doses", CHIYODA),
        ({"doses": [{"coupon": coupon(CHIYODA)}, {"coupon": coupon(SAPPORO)}]}, "doses", None),  # whose? both
        ({"doses": [{"coupon": coupon(CHIYODA)}, {"coupon": "misread"}, "x"]}, "doses", CHIYODA),  # refused items
        ({"doses": []}, "doses", None),
        ({"doses": {"coupon": coupon(CHIYODA)}}, "doses", None),
        ([{"coupon": coupon(CHIYODA)}], "doses", None),
    ],
)
def test_a_dose_write_is_the_data_of_its_coupons_municipality(
    body: object, items: str | None, whose: str | None
) -> None:
    assert coupons_municipality(json.dumps(body).encode(), "coupon", items) == whose


@pytest.mark.parametrize("body", [b"", b"{", b"[" * 100_000, '{"coupon": "\u3000"}'.encode()])
def test_a_body_that_is_not_json_names_no_municipality(body: bytes) -> None:
    assert coupons_municipality(body, "coupon", None) is None
