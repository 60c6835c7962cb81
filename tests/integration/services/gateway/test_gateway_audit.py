"""The audit trail: an entry for every personal-data access, never a My Number, keyed, anchored, batched."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import delete, text, update

from services.gateway import cli as gateway_cli
from services.gateway.audit import (
    GENESIS_MAC,
    Anchor,
    AuditChainBroken,
    AuditChains,
    AuditTrail,
    FileAnchorStore,
    LegalBasis,
    entry_mac,
    utc_text,
    verify_trail,
)
from services.gateway.models import AuditEntry
from services.gateway.settings import GatewaySettings
from shared.auth import Role
from shared.db import Database, Databases, utcnow
from shared.domain.codes import my_number_check_digit
from shared.domain.coupon import compose_coupon_line
from shared.domain.japan_time import JAPAN, japan_today
from shared.domain.period import kept_since
from shared.migrations import upgrade
from tests.integration.services.gateway.audit_support import (
    CHIYODA,
    CLINIC,
    KEY,
    SAPPORO,
    TABLE,
    M,
    execute,
    facts,
    problems_of,
    rows,
    trail,
)
from tests.integration.services.gateway.gateway_fakes import KNOWN_RESIDENT, MIGRATIONS, FakeUpstream, running_gateway

Token = Callable[..., dict[str, str]]
Settings = Callable[..., GatewaySettings]
DAY = timedelta(days=1)
MY_NUMBER = "98765432101" + str(my_number_check_digit("98765432101"))


async def test_personal_data_accesses_are_audited_with_who_what_why_and_no_my_number(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    settings = gateway_settings(registry_url=upstreams["registry"].url, records_url=upstreams["records"].url)
    chiyoda = token(Role.MUNICIPALITY, municipality=CHIYODA)
    async with running_gateway(settings) as (app, client):
        read = await client.get(
            f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}",
            headers={**chiyoda, "X-Access-Purpose": "consent", "X-Request-ID": "req-audit-1"},
        )
        lookup = await client.post(
            f"{M}/{CHIYODA}/transfer-lookups",
            json={"my_number": MY_NUMBER, "legal_basis": "my-number-act-19-16"},
            headers=chiyoda,
        )
        # A My Number where an id belongs is masked too.
        odd = await client.get(f"{M}/{CHIYODA}/residents/{MY_NUMBER}", headers=chiyoda)
        stranger = await client.get(
            f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=token(Role.MUNICIPALITY, municipality=SAPPORO)
        )
        dose = await client.post("/api/v1/doses", json={}, headers=token(Role.INSTITUTION, institution=CLINIC))
        assert [r.status_code for r in (read, lookup, odd, stranger, dose)] == [200, 404, 404, 404, 200]
        await app.state.audit.flush(timeout=5)
        entries = await rows(app.state.databases.main, settings.instance_id)

    read_action, lookup_action = f"GET {M}/{{code}}/residents/{{resident_id}}", f"POST {M}/{{code}}/transfer-lookups"
    # A read: one entry with the status the caller got, stored before the answer went out. Anything else that is
    # forwarded: an intent (outcome None) before, its outcome after. A refusal: one entry.
    assert [(e.seq, e.action, e.outcome, e.intent_seq) for e in entries] == [
        (1, read_action, 200, None),
        (2, lookup_action, None, None),
        (3, lookup_action, 404, 2),
        (4, read_action, 404, None),
        (5, read_action, 404, None),  # refused by the gateway, recorded all the same
        (6, "POST /api/v1/doses", None, None),
        (7, "POST /api/v1/doses", 200, 6),
    ]
    first, second, lookup_outcome, third, fourth, fifth, _ = entries
    assert {c: getattr(second, c) for c in ("request_id", "principal", "resource", "legal_basis")} == {
        c: getattr(lookup_outcome, c) for c in ("request_id", "principal", "resource", "legal_basis")
    }
    assert (first.principal, first.role, first.caller_municipality, first.municipality) == (
        CHIYODA,
        "municipality",
        CHIYODA,
        CHIYODA,
    )
    assert first.resource == f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}"
    assert first.legal_basis == "consent"
    assert first.request_id == "req-audit-1" == read.headers["x-request-id"]
    assert second.legal_basis == "my-number-act-19-16"
    assert third.resource == f"{M}/{CHIYODA}/residents/********{MY_NUMBER[-4:]}"
    assert (fourth.principal, fourth.caller_municipality, fourth.municipality) == (SAPPORO, SAPPORO, CHIYODA)
    assert fourth.legal_basis == "administration"
    assert (fifth.role, fifth.institution, fifth.municipality) == ("institution", CLINIC, None)

    async with Database.connect(settings.main_dsn, pool_size=1).sessionmaker() as session:
        dump = json.dumps([[str(v) for v in r] for r in (await session.execute(text("SELECT * FROM audit_trail")))])
        problems, _ = await verify_trail(
            session, settings.audit_key.encode(), FileAnchorStore(settings.audit_anchor_dir)
        )
    assert problems == []
    assert MY_NUMBER not in dump and MY_NUMBER[:8] not in dump


async def test_the_legal_basis_comes_from_the_fixed_list_or_the_request_is_refused(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    settings = gateway_settings(registry_url=upstreams["registry"].url)
    chiyoda = token(Role.MUNICIPALITY, municipality=CHIYODA)
    async with running_gateway(settings) as (app, client):
        before = len(upstreams["registry"].seen)
        free_text = await client.get(
            f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers={**chiyoda, "X-Access-Purpose": "just looking"}
        )
        bad_body = await client.post(
            f"{M}/{CHIYODA}/transfer-lookups",
            json={"my_number": MY_NUMBER, "legal_basis": "curiosity"},
            headers=chiyoda,
        )
        assert free_text.status_code == bad_body.status_code == 422
        assert free_text.json()["errors"] == [
            {"field": "X-Access-Purpose", "message": "must be one of administration, consent, my-number-act-19-16"}
        ]
        assert bad_body.json()["errors"][0]["field"] == "legal_basis"
        assert len(upstreams["registry"].seen) == before
        assert await rows(app.state.databases.main, settings.instance_id) == []
    assert {b.value for b in LegalBasis} == {"administration", "consent", "my-number-act-19-16"}


def lookups(*bases: str | None) -> dict[str, Any]:
    """A batch of transfer lookups with these legal bases (None: the item states none)."""
    items = [{"client_id": f"c{i}", "my_number": MY_NUMBER, "legal_basis": b} for i, b in enumerate(bases)]
    return {"lookups": [{k: v for k, v in item.items() if v is not None} for item in items]}


BATCH, SINGLE = f"{M}/{CHIYODA}/transfer-lookups/batch", f"{M}/{CHIYODA}/transfer-lookups"
BOTH = "consent,my-number-act-19-16"
NOT_A_BASIS = "must be consent or my-number-act-19-16"


async def post_lookup(
    settings: GatewaySettings,
    upstreams: dict[str, FakeUpstream],
    token: Token,
    path: str,
    body: Any,
    purpose: str | None,
) -> tuple[Any, list[str | None], list[AuditEntry]]:
    """The answer, the ``X-Access-Purpose`` registry got (one per forwarded request) and the audit entries."""
    headers = token(Role.MUNICIPALITY, municipality=CHIYODA)
    if purpose is not None:
        headers["X-Access-Purpose"] = purpose
    async with running_gateway(settings) as (app, client):
        before = len(upstreams["registry"].seen)
        response = await client.post(path, json=body, headers=headers)
        await app.state.audit.flush(timeout=5)
        entries = await rows(app.state.databases.main, settings.instance_id)
    return response, [seen.header("x-access-purpose") for seen in upstreams["registry"].seen[before:]], entries


@pytest.mark.parametrize(
    ("path", "body", "sent_purpose", "bases"),
    [
        # A contract client sends no header: the bases come from the body, whatever a header says.
        (BATCH, lookups("my-number-act-19-16", "consent", "consent"), None, BOTH),
        (BATCH, lookups("consent", "consent"), None, "consent"),
        (BATCH, lookups("consent", "consent"), "my-number-act-19-16", "consent"),
        (BATCH, lookups("my-number-act-19-16"), "administration", "my-number-act-19-16"),
        (SINGLE, {"my_number": MY_NUMBER, "legal_basis": "consent"}, "my-number-act-19-16", "consent"),
        (BATCH, lookups(*["consent"] * 999, "my-number-act-19-16"), None, BOTH),  # the largest batch
    ],
)
async def test_a_transfer_lookup_is_audited_with_the_bases_its_body_states_and_registry_is_told_them(
    gateway_settings: Settings,
    upstreams: dict[str, FakeUpstream],
    token: Token,
    path: str,
    body: Any,
    sent_purpose: str | None,
    bases: str,
) -> None:
    settings = gateway_settings(registry_url=upstreams["registry"].url)
    response, told, entries = await post_lookup(settings, upstreams, token, path, body, sent_purpose)
    assert response.status_code == 404  # forwarded: the fake registry knows nobody
    assert told == [bases]
    assert [(e.outcome, e.legal_basis) for e in entries] == [(None, bases), (404, bases)]


@pytest.mark.parametrize(
    ("path", "body", "sent_purpose", "field", "message"),
    [
        (BATCH, lookups("consent", "consent", "consent", None), None, "lookups[3].legal_basis", NOT_A_BASIS),
        (BATCH, lookups("consent", "administration"), BOTH, "lookups[1].legal_basis", NOT_A_BASIS),
        (BATCH, lookups("curiosity"), None, "lookups[0].legal_basis", NOT_A_BASIS),
        (BATCH, lookups(*["consent"] * 999, "because"), None, "lookups[999].legal_basis", NOT_A_BASIS),
        (BATCH, {"lookups": []}, "consent", "lookups", "must be a non-empty list, each item with its legal_basis"),
        (BATCH, {"lookups": "consent"}, None, "lookups", "must be a non-empty list, each item with its legal_basis"),
        (
            BATCH,
            {"legal_basis": "consent"},
            "consent",
            "lookups",
            "must be a non-empty list, each item with its legal_basis",
        ),
        (SINGLE, {"my_number": MY_NUMBER}, "consent", "legal_basis", NOT_A_BASIS),
        (SINGLE, [{"legal_basis": "consent"}], None, "legal_basis", NOT_A_BASIS),
    ],
)
async def test_a_transfer_lookup_without_a_known_basis_is_refused_naming_the_field_before_anything_acts(
    gateway_settings: Settings,
    upstreams: dict[str, FakeUpstream],
    token: Token,
    path: str,
    body: Any,
    sent_purpose: str | None,
    field: str,
    message: str,
) -> None:
    settings = gateway_settings(registry_url=upstreams["registry"].url)
    response, told, entries = await post_lookup(settings, upstreams, token, path, body, sent_purpose)
    assert response.status_code == 422
    assert response.json()["errors"] == [{"field": field, "message": message}]
    assert (told, entries) == ([], [])


async def test_other_requests_and_unauthenticated_attempts_leave_no_entry(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    settings = gateway_settings(registry_url=upstreams["registry"].url, stats_url=upstreams["stats"].url)
    async with running_gateway(settings) as (app, client):
        await client.get("/api/v1/stats/doses")
        await client.get(f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}")  # 401: nobody to record
        await client.get("/internal/v1/anything", headers=token(Role.MUNICIPALITY, municipality=CHIYODA))
        await client.get(
            f"{M}/{CHIYODA}/resident-imports/imp-1", headers=token(Role.MUNICIPALITY, municipality=CHIYODA)
        )
        assert await rows(app.state.databases.main, settings.instance_id) == []


async def test_what_the_trail_cannot_record_is_never_forwarded_or_never_answered(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token, tmp_path: Path
) -> None:
    dsn = f"sqlite+aiosqlite:///{tmp_path / 'doomed.db'}"
    await asyncio.to_thread(upgrade, dsn, MIGRATIONS)
    settings = gateway_settings(main_dsn=dsn, registry_url=upstreams["registry"].url)
    chiyoda = token(Role.MUNICIPALITY, municipality=CHIYODA)
    unavailable = {"error": "ServiceUnavailable", "detail": "the audit trail is unavailable; retry"}
    async with running_gateway(settings) as (app, client):
        async with app.state.databases.main.sessionmaker() as session, session.begin():
            await session.execute(text("DROP TABLE audit_trail"))
        before = len(upstreams["registry"].seen)
        # A request that may change something: refused before the service sees it.
        lookup = await client.post(
            f"{M}/{CHIYODA}/transfer-lookups",
            json={"my_number": MY_NUMBER, "legal_basis": "my-number-act-19-16"},
            headers=chiyoda,
        )
        assert (lookup.status_code, lookup.json()) == (503, unavailable)
        assert len(upstreams["registry"].seen) == before  # the service never saw it
        # A read: the service answered, but its answer never leaves the gateway.
        response = await client.get(f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=chiyoda)
        assert (response.status_code, response.json()) == (503, unavailable)
        assert len(upstreams["registry"].seen) == before + 1
        # Refusals carry no data: they are answered even so.
        refused = await client.get(
            f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=token(Role.MUNICIPALITY, municipality=SAPPORO)
        )
        assert refused.status_code == 404


async def test_a_municipality_reads_its_own_entries_and_no_one_elses(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    settings = gateway_settings(registry_url=upstreams["registry"].url)
    chiyoda = token(Role.MUNICIPALITY, municipality=CHIYODA)
    sapporo = token(Role.MUNICIPALITY, municipality=SAPPORO)
    async with running_gateway(settings) as (app, client):
        await client.get(f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=chiyoda)
        await client.get(f"{M}/{SAPPORO}/residents/r-elsewhere", headers=sapporo)
        await client.get(f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=sapporo)  # an attempt on Chiyoda
        await app.state.audit.flush(timeout=5)

        own = await client.get(f"{M}/{CHIYODA}/audit", headers=chiyoda)
        assert own.status_code == 200
        entries = [e for e in own.json()["entries"] if e["instance"] == settings.instance_id]
        assert [(e["principal"], e["municipality"], e["outcome"], e["intent_seq"]) for e in entries] == [
            (CHIYODA, CHIYODA, 200, None),  # a read: one entry, stored before the answer went out
            (SAPPORO, CHIYODA, 404, None),  # refused at the gateway: one entry too
        ]
        assert set(entries[0]) >= {"principal", "role", "action", "resource", "legal_basis", "recorded_at", "outcome"}
        assert "mac" not in entries[0]

        assert (await client.get(f"{M}/{CHIYODA}/audit", headers=sapporo)).status_code == 403
        assert (await client.get(f"{M}/{CHIYODA}/audit")).status_code == 401
        future = await client.get(f"{M}/{CHIYODA}/audit?from=2999-01-01", headers=chiyoda)
        # Where retention stands: entries from midnight in Japan starting this day seven years ago are kept.
        kept_from = utc_text(kept_since(utcnow(), settings.audit_keep_years))
        assert future.json() == {"entries": [], "truncated": False, "next": None, "kept_from": kept_from}
        assert kept_from.endswith("T15:00:00.000000Z")
        # A date is a whole Japanese day: the entries' own, and not the day before or after it.
        recorded = datetime.fromisoformat(entries[0]["recorded_at"])
        today = japan_today(recorded)
        for since, until, expected in ((today, today, 2), (today - DAY, today - DAY, 0), (today + DAY, None, 0)):
            window = await client.get(
                f"{M}/{CHIYODA}/audit", params={"from": str(since), "to": str(until or "")}, headers=chiyoda
            )
            assert len([e for e in window.json()["entries"] if e["instance"] == settings.instance_id]) == expected
        # A date-time without a zone is Japan's time: the same moment as with its zone.
        moment = recorded.astimezone(JAPAN)
        for spelled in (moment.isoformat(), moment.replace(tzinfo=None).isoformat()):
            after = await client.get(f"{M}/{CHIYODA}/audit", params={"from": spelled}, headers=chiyoda)
            assert entries[0] in after.json()["entries"]
        bad = await client.get(f"{M}/{CHIYODA}/audit?from=yesterday", headers=chiyoda)
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "from"


async def test_an_institutions_dose_write_is_in_the_audit_of_the_coupons_municipality(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    """Whose data a dose is: the municipality that issued its coupon, which reads who wrote it and when."""
    settings = gateway_settings(records_url=upstreams["records"].url)
    clinic = token(Role.INSTITUTION, institution=CLINIC)

    def line(municipality: str, number: str) -> str:
        return compose_coupon_line(kind=1, dose_number=1, municipality_code=municipality, coupon_number=number)

    async with running_gateway(settings) as (app, client):
        sent = {
            "single": ("/api/v1/doses", {"coupon": line(CHIYODA, "0000000001")}),
            "one-municipality": (
                "/api/v1/doses/batch",
                {"doses": [{"coupon": line(CHIYODA, "0000000002")}, {"coupon": line(CHIYODA, "0000000003")}]},
            ),
            "two-municipalities": (
                "/api/v1/doses/batch",
                {"doses": [{"coupon": line(CHIYODA, "0000000004")}, {"coupon": line(SAPPORO, "0000000005")}]},
            ),
        }
        for name, (path, body) in sent.items():
            answer = await client.post(path, json=body, headers={**clinic, "X-Request-ID": name})
            assert answer.status_code == 200, answer.text
        await app.state.audit.flush(timeout=5)
        entries = await rows(app.state.databases.main, settings.instance_id)
        # The intent and its outcome alike; a batch of several municipalities' coupons names none of them.
        assert [(e.request_id, e.outcome is None, e.municipality, e.institution) for e in entries] == [
            ("single", True, CHIYODA, CLINIC),
            ("single", False, CHIYODA, CLINIC),
            ("one-municipality", True, CHIYODA, CLINIC),
            ("one-municipality", False, CHIYODA, CLINIC),
            ("two-municipalities", True, None, CLINIC),
            ("two-municipalities", False, None, CLINIC),
        ]
        for code, expected in ((CHIYODA, ["one-municipality", "single"]), (SAPPORO, [])):
            read = await client.get(f"{M}/{code}/audit", headers=token(Role.MUNICIPALITY, municipality=code))
            mine = [e for e in read.json()["entries"] if e["instance"] == settings.instance_id]
            assert sorted({e["request_id"] for e in mine}) == sorted(expected)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_municipality_pages_through_its_entries_in_order_none_skipped_or_repeated(
    gateway_settings: Settings,
    upstreams: dict[str, FakeUpstream],
    token: Token,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    """A month of a city's entries is far more than one answer: ``next`` of one page is ``after`` of the next, and
    the pages hold every entry once, in order — those made by the municipality about its own data too (they are
    found through both its columns)."""
    overrides: dict[str, Any] = {"registry_url": upstreams["registry"].url}
    if backend == "postgres":
        overrides["main_dsn"] = request.getfixturevalue("make_database")("gateway", MIGRATIONS)
    settings = gateway_settings(**overrides)
    chiyoda = token(Role.MUNICIPALITY, municipality=CHIYODA)
    sapporo = token(Role.MUNICIPALITY, municipality=SAPPORO)
    async with running_gateway(settings) as (app, client):
        since = utcnow().isoformat()
        for _ in range(3):
            await client.get(f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=chiyoda)  # its own data
            await client.get(f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=sapporo)  # about its data
        await client.get(f"{M}/{SAPPORO}/residents/r-elsewhere", headers=sapporo)  # neither
        await app.state.audit.flush(timeout=5)

        whole = await client.get(f"{M}/{CHIYODA}/audit", params={"from": since}, headers=chiyoda)
        assert whole.json()["truncated"] is False and whole.json()["next"] is None
        assert [e["principal"] for e in whole.json()["entries"]] == [CHIYODA, SAPPORO] * 3
        pages, after = [], None
        while True:
            params = {"from": since, "limit": "2"} | ({} if after is None else {"after": after})
            page = (await client.get(f"{M}/{CHIYODA}/audit", params=params, headers=chiyoda)).json()
            pages.append(page["entries"])
            after = page["next"]
            assert (after is None) is (page["truncated"] is False)
            if after is None:
                break
        assert [len(p) for p in pages] == [2, 2, 2]
        assert [e for p in pages for e in p] == whole.json()["entries"]

        # An entry of another municipality's trail is not a place to start from: it would tell when that one read.
        elsewhere = (await client.get(f"{M}/{SAPPORO}/audit", params={"from": since}, headers=sapporo)).json()
        theirs = next(e for e in elsewhere["entries"] if e["municipality"] == SAPPORO)
        for params in (
            {"after": f"{theirs['instance']}:{theirs['seq']}"},
            {"after": "no-colon"},
            {"after": f"{settings.instance_id}:0"},
            {"after": f"{settings.instance_id}:999999999"},
            {"limit": "0"},
            {"limit": "1001"},
            {"limit": "ten"},
        ):
            bad = await client.get(f"{M}/{CHIYODA}/audit", params=params, headers=chiyoda)
            assert bad.status_code == 422, (params, bad.text)
            assert [e["field"] for e in bad.json()["errors"]] == list(params), params


# --- the chains themselves, on SQLite and on PostgreSQL ---


async def test_entries_are_keyed_onto_each_other_and_anchored(audit_dbs: Databases, anchors: FileAnchorStore) -> None:
    async with trail(audit_dbs, anchors) as writer:
        for n in range(1, 8):
            await writer.append(facts(n))
    stored = await rows(audit_dbs.main, "gw-a")
    assert [e.seq for e in stored] == list(range(1, 8))
    assert stored[0].prev_mac == GENESIS_MAC
    for before, after in itertools.pairwise(stored):
        assert after.prev_mac == before.mac
    for entry in stored:
        fields = {c.name: getattr(entry, c.name) for c in AuditEntry.__table__.columns}
        assert entry.mac == entry_mac(KEY, entry.prev_mac, fields)
    anchor = await anchors.read("gw-a")
    assert anchor is not None and (anchor.seq, anchor.mac) == (7, stored[-1].mac)
    assert await problems_of(audit_dbs, anchors) == []
    # Without the key nothing verifies: whoever holds only the database cannot re-key a forgery.
    assert await problems_of(audit_dbs, anchors, key=b"x" * 32) == [
        "chain gw-a: entry changed (MAC does not match) at seq 1"
    ]


async def test_concurrent_requests_share_batches_and_form_one_chain(
    audit_dbs: Databases, anchors: FileAnchorStore
) -> None:
    async with trail(audit_dbs, anchors) as writer:
        await asyncio.gather(*(writer.append(facts(n)) for n in range(300)))
        assert writer.batches < 300 / 5  # many entries per commit under load
    assert [e.seq for e in await rows(audit_dbs.main, "gw-a")] == list(range(1, 301))
    assert await problems_of(audit_dbs, anchors) == []


async def test_what_each_request_waited_for_its_entry_is_on_metrics_by_kind(
    audit_dbs: Databases, anchors: FileAnchorStore
) -> None:
    """Operators see how long requests wait on the trail: an intent before its request is forwarded, a read's
    entry before its answer leaves; an outcome entry (nobody waits) is not counted."""

    def waited(entry: str) -> tuple[float, float]:
        labels = {"entry": entry}
        count = REGISTRY.get_sample_value("vrs_gateway_audit_wait_seconds_count", labels) or 0.0
        return count, REGISTRY.get_sample_value("vrs_gateway_audit_wait_seconds_sum", labels) or 0.0

    before = {entry: waited(entry) for entry in ("intent", "read")}
    async with trail(audit_dbs, anchors) as writer:
        intent_seq = await writer.append(facts(1, outcome=None))
        writer.record(facts(1).with_outcome(201, intent_seq))
        await asyncio.gather(*(writer.append(facts(n)) for n in range(2, 5)))
        await writer.flush(timeout=5)
    counted = {entry: (waited(entry)[0] - n, waited(entry)[1] - s) for entry, (n, s) in before.items()}
    assert counted["intent"][0] == 1 and counted["read"][0] == 3
    assert counted["intent"][1] > 0 and counted["read"][1] > 0


async def test_replicas_write_separate_chains_and_never_fail(audit_dbs: Databases, anchors: FileAnchorStore) -> None:
    async with trail(audit_dbs, anchors, "gw-a") as a, trail(audit_dbs, anchors, "gw-b") as b:
        await asyncio.gather(*(w.append(facts(n)) for n in range(100) for w in (a, b)))
    for instance in ("gw-a", "gw-b"):
        assert [e.seq for e in await rows(audit_dbs.main, instance)] == list(range(1, 101))
    assert await problems_of(audit_dbs, anchors) == []


async def test_a_restarted_instance_continues_its_chain(audit_dbs: Databases, anchors: FileAnchorStore) -> None:
    for n in range(3):
        async with trail(audit_dbs, anchors) as writer:
            await writer.append(facts(n))
    assert [e.seq for e in await rows(audit_dbs.main, "gw-a")] == [1, 2, 3]
    assert await problems_of(audit_dbs, anchors) == []


@pytest.mark.parametrize(
    ("column", "value"),
    [("principal", "someone-else"), ("outcome", 200 + 1), ("legal_basis", "consent"), ("resource", "/elsewhere")],
)
async def test_a_changed_entry_is_detected_where_it_was(
    audit_dbs: Databases, anchors: FileAnchorStore, column: str, value: object
) -> None:
    async with trail(audit_dbs, anchors) as writer:
        for n in range(6):
            await writer.append(facts(n))
    await execute(audit_dbs, update(TABLE).where(TABLE.c.seq == 3).values({column: value}))
    assert await problems_of(audit_dbs, anchors) == ["chain gw-a: entry changed (MAC does not match) at seq 3"]


async def test_a_deleted_entry_is_detected_where_it_was(audit_dbs: Databases, anchors: FileAnchorStore) -> None:
    async with trail(audit_dbs, anchors) as writer:
        for n in range(6):
            await writer.append(facts(n))
    await execute(audit_dbs, delete(TABLE).where(TABLE.c.seq == 4))
    assert await problems_of(audit_dbs, anchors) == ["chain gw-a: entry missing at seq 4"]


async def test_a_truncated_or_emptied_chain_is_detected_and_not_appended_to(
    audit_dbs: Databases, anchors: FileAnchorStore
) -> None:
    async with trail(audit_dbs, anchors) as writer:
        for n in range(6):
            await writer.append(facts(n))
    await execute(audit_dbs, delete(TABLE).where(TABLE.c.seq > 4))
    assert await problems_of(audit_dbs, anchors) == ["chain gw-a: truncated: the anchored head is seq 6 at seq 5"]
    # Appending would overwrite the evidence (the anchor): the instance refuses to start.
    with pytest.raises(AuditChainBroken):
        async with trail(audit_dbs, anchors):
            pass
    await execute(audit_dbs, delete(TABLE))
    assert await problems_of(audit_dbs, anchors) == ["chain gw-a: truncated: the anchored head is seq 6 at seq 1"]


async def test_vrs_audit_verify(
    audit_dbs: Databases, anchors: FileAnchorStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with trail(audit_dbs, anchors) as writer:
        for n in range(3):
            await writer.append(facts(n))
    monkeypatch.setenv("VRS_GATEWAY_MAIN_DSN", audit_dbs.main.engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("VRS_GATEWAY_AUDIT_KEY", KEY.decode())
    monkeypatch.setenv("VRS_GATEWAY_AUDIT_ANCHOR_DIR", str(anchors.directory))
    assert await gateway_cli.verify_configured() == 0
    assert "intact: 3 entries" in capsys.readouterr().out
    await execute(audit_dbs, delete(TABLE).where(TABLE.c.seq == 3))
    assert await gateway_cli.verify_configured() == 1
    assert "BROKEN: chain gw-a: truncated" in capsys.readouterr().out


class _AnchorFailsOnce(FileAnchorStore):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.failures = 1

    async def write(self, instance: str, anchor: Anchor) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("anchor volume unavailable")
        await super().write(instance, anchor)


async def test_entries_nobody_waits_for_are_retried_and_never_stored_twice(
    audit_dbs: Databases, tmp_path: Path
) -> None:
    """A batch committed but reported failed (here: its anchor write failed) is recognised by the head it left."""
    anchors = _AnchorFailsOnce(tmp_path / "anchors")
    async with trail(audit_dbs, anchors) as writer:
        for n in range(3):
            writer.record(facts(n))
        await writer.flush(timeout=5)
        assert anchors.failures == 0
        await writer.append(facts(3))
    assert [(e.seq, e.request_id) for e in await rows(audit_dbs.main, "gw-a")] == [
        (1, "req-0"),
        (2, "req-1"),
        (3, "req-2"),
        (4, "req-3"),
    ]
    assert await problems_of(audit_dbs, anchors) == []


async def test_an_outcome_waits_a_moment_for_the_next_intent_to_share_its_commit(
    audit_dbs: Databases, anchors: FileAnchorStore
) -> None:
    writer = AuditTrail(audit_dbs, key=KEY, instance="gw-l", anchors=anchors, linger=0.5)
    await writer.start()
    try:
        writer.record(facts(1))  # nobody waits for it
        await asyncio.sleep(0.05)
        assert writer.batches == 0
        assert await writer.append(facts(2, outcome=None)) == 2  # takes the outcome along: one commit
        assert writer.batches == 1
        writer.record(facts(3))  # alone: stored once the linger is over
        await writer.flush(timeout=5)
        assert writer.batches == 2
    finally:
        await writer.stop()
    assert [(e.seq, e.request_id) for e in await rows(audit_dbs.main, "gw-l")] == [
        (1, "req-1"),
        (2, "req-2"),
        (3, "req-3"),
    ]
    assert await problems_of(audit_dbs, anchors) == []


async def test_of_two_idle_chains_the_next_intent_joins_the_one_holding_an_outcome(
    audit_dbs: Databases, anchors: FileAnchorStore
) -> None:
    trails = [AuditTrail(audit_dbs, key=KEY, instance=name, anchors=anchors, linger=0.5) for name in ("gw-q", "gw-q.1")]
    chains = AuditChains(trails)
    await chains.start()
    try:
        await asyncio.sleep(0.01)
        trails[1].record(facts(1))  # the chain that has been idle for the shorter time
        await asyncio.sleep(0.05)
        stored_by, seq = await chains.append(facts(2, outcome=None))
        assert (stored_by.instance, seq, chains.batches) == ("gw-q.1", 2, 1)
    finally:
        await chains.stop()


async def test_while_one_chain_commits_the_next_intent_is_stored_by_another(
    audit_dbs: Databases, anchors: FileAnchorStore
) -> None:
    """The pipeline: a request never waits behind a commit in progress while another chain is free."""
    trails = [AuditTrail(audit_dbs, key=KEY, instance=name, anchors=anchors) for name in ("gw-p", "gw-p.1")]
    chains = AuditChains(trails)
    await chains.start()
    try:
        slow, release = trails[0], asyncio.Event()
        write = slow._write

        async def slow_write(batch: Any) -> None:
            await release.wait()  # a commit that takes its time
            await write(batch)

        slow._write = slow_write  # type: ignore[method-assign]
        first = asyncio.create_task(chains.append(facts(1, outcome=None)))
        await asyncio.sleep(0.05)
        assert not first.done()
        stored_by, seq = await asyncio.wait_for(chains.append(facts(2, outcome=None)), timeout=5)
        assert (stored_by.instance, seq) == ("gw-p.1", 1)
        stored_by.record(facts(2, intent_seq=seq))
        release.set()
        stored_by, seq = await first
        assert (stored_by.instance, seq) == ("gw-p", 1)
        stored_by.record(facts(1, intent_seq=seq))
        await chains.flush(timeout=5)
    finally:
        await chains.stop()
    for instance, n in (("gw-p", 1), ("gw-p.1", 2)):
        assert [(e.seq, e.request_id, e.outcome, e.intent_seq) for e in await rows(audit_dbs.main, instance)] == [
            (1, f"req-{n}", None, None),
            (2, f"req-{n}", 200, 1),
        ]
    assert await problems_of(audit_dbs, anchors) == []


async def test_several_chains_per_process_share_the_load_and_keep_each_intent_with_its_outcome(
    gateway_settings: Settings, upstreams: dict[str, FakeUpstream], token: Token
) -> None:
    settings = gateway_settings(registry_url=upstreams["registry"].url, audit_chains=3)
    chiyoda = token(Role.MUNICIPALITY, municipality=CHIYODA)
    async with running_gateway(settings) as (app, client):
        lookup = {"my_number": MY_NUMBER, "legal_basis": "my-number-act-19-16"}
        answers = await asyncio.gather(
            *(client.get(f"{M}/{CHIYODA}/residents/{KNOWN_RESIDENT}", headers=chiyoda) for _ in range(30)),
            *(client.post(f"{M}/{CHIYODA}/transfer-lookups", json=lookup, headers=chiyoda) for _ in range(30)),
        )
        assert [r.status_code for r in answers] == [200] * 30 + [404] * 30
        await app.state.audit.flush(timeout=5)
        names = [settings.instance_id, f"{settings.instance_id}.1", f"{settings.instance_id}.2"]
        chains = {name: await rows(app.state.databases.main, name) for name in names}
    # One entry a read, an intent and an outcome a lookup.
    assert sum(len(entries) for entries in chains.values()) == 30 + 2 * 30
    assert sum(1 for entries in chains.values() for e in entries if e.action.startswith("GET")) == 30
    for entries in chains.values():
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
        reads = [e for e in entries if e.action.startswith("GET")]
        assert all((e.outcome, e.intent_seq) == (200, None) for e in reads)
        intents = {e.seq: e for e in entries if e.outcome is None}
        outcomes = [e for e in entries if e.outcome is not None and not e.action.startswith("GET")]
        # Every outcome follows its own intent in the same chain, and every intent has one.
        assert sorted(e.intent_seq for e in outcomes) == sorted(intents)  # type: ignore[type-var]
        assert all(e.intent_seq < e.seq and intents[e.intent_seq].request_id == e.request_id for e in outcomes)  # type: ignore[operator,index]
    async with Database.connect(settings.main_dsn, pool_size=1).sessionmaker() as session:
        problems, _ = await verify_trail(
            session, settings.audit_key.encode(), FileAnchorStore(settings.audit_anchor_dir)
        )
    assert problems == []


async def test_a_nul_character_in_a_path_or_subject_cannot_jam_the_chain(
    audit_dbs: Databases, anchors: FileAnchorStore
) -> None:
    """PostgreSQL's text holds no NUL: an entry carrying one (a refused request for ``/…/residents/a%00b``) must
    not fail its batch — refusals are retried until stored, so it would fail every batch after it."""
    async with trail(audit_dbs, anchors) as writer:
        writer.record(facts(1, resource=f"{M}/{SAPPORO}/residents/a\x00b", principal="x\x00y"))
        assert await asyncio.wait_for(writer.append(facts(2)), timeout=5) == 2
    stored = await rows(audit_dbs.main, "gw-a")
    assert [(e.seq, e.resource, e.principal) for e in stored] == [
        (1, f"{M}/{SAPPORO}/residents/a\ufffdb", "x\ufffdy"),
        (2, f"{M}/{CHIYODA}/residents/r-2", CHIYODA),
    ]
    assert await problems_of(audit_dbs, anchors) == []


async def test_a_refusal_naming_an_impossible_municipality_cannot_jam_the_chain(
    audit_dbs: Databases, anchors: FileAnchorStore
) -> None:
    """The municipality of an entry comes from the path; ``/…/municipalities/1234567/…`` does not fit the column."""
    async with trail(audit_dbs, anchors) as writer:
        writer.record(facts(1, municipality="1234567", outcome=404))
        writer.record(facts(2, municipality="13\x001", outcome=404))
        assert await asyncio.wait_for(writer.append(facts(3)), timeout=5) == 3
    stored = await rows(audit_dbs.main, "gw-a")
    assert [(e.seq, e.municipality) for e in stored] == [(1, None), (2, None), (3, CHIYODA)]
    assert all(M + "/" in e.resource for e in stored)  # what was asked for stays in the resource
    assert await problems_of(audit_dbs, anchors) == []
