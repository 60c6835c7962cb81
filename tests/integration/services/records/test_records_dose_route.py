"""``POST /api/v1/doses`` over HTTP on PostgreSQL: the plain request takes records' direct route, anything else
FastAPI's handler of the same endpoint; both answer alike, byte for byte, and every refusal is FastAPI's."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError, OperationalError

from services.records import repository, router
from services.records.app import create_app
from services.records.repository import RecordsDatabases
from services.records.service import Submission, record_doses
from services.records.settings import RecordsSettings
from shared.auth import Role
from shared.db import UnitOfWork
from shared.domain.vaccines import default_rules
from shared.heap import YOUNG_OBJECTS
from shared.migrations import SERVICES_DIR
from shared.settings import BusSettings
from tests.factories import internal_headers
from tests.integration.services.records.records_support import CHIYODA, CLINIC, TODAY, dose, line

TREES = SERVICES_DIR / "records" / "migrations"
PATH = "/api/v1/doses"
CLINIC_HEADERS = internal_headers(Role.INSTITUTION, institution="1312345678")
# FastAPI's handler reads any ``application/*+json`` body as JSON; records' direct route only application/json.
DOCUMENTED = {"Content-Type": "application/vnd.vrs+json"}
DIRECT = {"Content-Type": "application/json"}


@pytest.fixture
async def served(make_database: Callable[..., str], tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """records' app on two migrated PostgreSQL shards, and an HTTP client of it."""
    main = make_database("records_main", TREES / "main")
    s0, s1 = make_database("records_s0", TREES / "shard"), make_database("records_s1", TREES / "shard")
    settings = RecordsSettings(
        main_dsn=main,
        shard_dsns={"s0": s0, "s1": s1},
        bus=BusSettings(kind="embedded", embedded_path=tmp_path / "events.db"),
        run_relay=False,
        run_consumer=False,
        run_imports=False,
    )
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://records") as http,
    ):
        yield http, app


@pytest.fixture
def client(served: tuple[httpx.AsyncClient, Any]) -> httpx.AsyncClient:
    return served[0]


@pytest.fixture
def default_collector() -> Iterator[None]:
    """Python's own collector settings, as before any app of this test process started."""
    before = gc.get_threshold()
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)


async def test_once_started_records_keeps_the_collector_off_its_lasting_and_its_young_objects(
    default_collector: None, client: httpx.AsyncClient
) -> None:
    """What the app keeps for life is frozen out of the cyclic collector's sight, and young collections wait
    for YOUNG_OBJECTS allocations: a batch's ~50,000 objects are mostly freed before one sees them
    (``shared.heap.settle_heap``)."""
    assert gc.get_threshold()[0] == YOUNG_OBJECTS
    assert gc.get_freeze_count() > 10_000


@pytest.fixture
def direct(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of the requests records' direct route took."""
    taken: list[str] = []
    plain = router._plain_single_dose

    async def counted(request: Any) -> Any:
        found = await plain(request)
        if found is not None:
            taken.append(found[1])
        return found

    monkeypatch.setattr(router, "_plain_single_dose", counted)
    return taken


def body(coupon_number: str, **changes: Any) -> dict[str, Any]:
    return {
        "coupon": line(coupon_number),
        "dose_number": 1,
        "vaccinated_on": "2021-06-01",
        "vaccine": "pfizer",
        "lot_number": "EY0583",
    } | changes


async def post(
    client: httpx.AsyncClient, doc: dict[str, Any] | str, *, key: str | None, route: dict[str, str], **headers: Any
) -> httpx.Response:
    content = doc if isinstance(doc, str) else json.dumps(doc)
    sent = CLINIC_HEADERS | route | headers | ({"Idempotency-Key": key} if key is not None else {})
    return await client.post(PATH, content=content, headers=sent)


async def test_both_routes_answer_a_dose_alike(client: httpx.AsyncClient, direct: list[str]) -> None:
    first = await post(client, body("0000000001"), key="k1", route=DIRECT)
    assert first.status_code == 201, first.text
    assert first.json()["status"] == "unmatched" and first.json()["findings"] == []
    replayed = await post(client, body("0000000001"), key="k1", route=DOCUMENTED)
    assert (replayed.status_code, replayed.content) == (201, first.content)
    assert replayed.headers["content-type"] == first.headers["content-type"] == "application/json"
    assert replayed.headers["content-length"] == first.headers["content-length"]

    # A double scan under a new key: 200 and the first dose, whichever route answers.
    scans = [
        await post(client, body("0000000001"), key=f"scan-{n}", route=r) for n, r in enumerate((DIRECT, DOCUMENTED))
    ]
    assert [s.status_code for s in scans] == [200, 200]
    assert scans[0].content == scans[1].content
    assert scans[0].json() == {"dose_id": first.json()["dose_id"], "status": "duplicate", "findings": []}

    # Findings travel the same way: dose 2 three days after dose 1 is too early.
    second = body("0000000001", dose_number=2, vaccinated_on="2021-06-04")
    early = await post(client, second, key="k2", route=DIRECT)
    assert early.status_code == 201 and early.json()["status"] == "needs_review"
    assert early.json()["findings"]
    assert (await post(client, second, key="k2", route=DOCUMENTED)).content == early.content
    assert direct == ["k1", "scan-0", "k2"]


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8", "Application/JSON"])
async def test_a_json_body_takes_the_direct_route_with_or_without_parameters(
    client: httpx.AsyncClient, direct: list[str], content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    answer = await client.post(
        PATH, content=json.dumps(body("0000000005")), headers=CLINIC_HEADERS | headers | {"Idempotency-Key": "k"}
    )
    assert answer.status_code == 201, answer.text
    assert direct == ["k"]


async def test_a_body_in_another_encoding_is_left_to_fastapi(client: httpx.AsyncClient, direct: list[str]) -> None:
    utf16 = json.dumps(body("0000000006")).encode("utf-16")
    headers = CLINIC_HEADERS | {"Content-Type": "application/json; charset=utf-16", "Idempotency-Key": "k"}
    answer = await client.post(PATH, content=utf16, headers=headers)
    assert answer.status_code == 201, answer.text  # json.loads reads UTF-16; pydantic's JSON parser does not
    assert direct == []


@pytest.mark.parametrize(
    ("doc", "key", "headers", "status", "field"),
    [
        (body("0000000002"), None, {}, 400, None),  # no key
        (body("0000000002"), "", {}, 400, None),
        (body("0000000002"), "k" * 201, {}, 422, "Idempotency-Key"),
        (body("0000000002", extra="x"), "k", {}, 422, "extra"),
        (body("0000000002", dose_number="one"), "k", {}, 422, "dose_number"),
        ({k: v for k, v in body("0000000002").items() if k != "vaccine"}, "k", {}, 422, "vaccine"),
        ('{"coupon": ', "k", {}, 422, None),  # not JSON
        ("", "k", {}, 422, "body"),
        # The headers themselves, not a dict of them made at collection: their token is taken when the test runs.
        (body("0000000002"), "k", internal_headers(Role.NATIONAL), 403, None),
        (body("0000000002"), "k", internal_headers(Role.ANONYMOUS), 401, None),
    ],
)
async def test_what_the_direct_route_does_not_take_is_refused_as_documented(
    client: httpx.AsyncClient,
    doc: dict[str, Any] | str,
    key: str | None,
    headers: Mapping[str, str],
    status: int,
    field: str | None,
    direct: list[str],
) -> None:
    answers = [await post(client, doc, key=key, route=route, **headers) for route in (DIRECT, DOCUMENTED)]
    assert [a.status_code for a in answers] == [status, status], answers[0].text
    assert answers[0].json() == answers[1].json()
    assert direct == []  # FastAPI's handler answered both
    if field is not None:
        assert field in [e["field"] for e in answers[0].json()["errors"]]


async def test_a_key_again_with_another_body_is_a_conflict_on_either_route(
    client: httpx.AsyncClient, direct: list[str]
) -> None:
    assert (await post(client, body("0000000003"), key="k", route=DIRECT)).status_code == 201
    answers = [
        await post(client, body("0000000003", lot_number="FA5765"), key="k", route=r) for r in (DIRECT, DOCUMENTED)
    ]
    assert [a.status_code for a in answers] == [409, 409]
    assert answers[0].json() == answers[1].json() and answers[0].json()["error"] == "Conflict"
    assert direct == ["k", "k"]  # the first and the conflicting one: refused by the rules, not the route


async def test_a_batch_item_whose_fields_do_not_validate_is_rejected_alone(client: httpx.AsyncClient) -> None:
    """A tablet's batch with one mistyped item records the others; each bad field is named in the batch."""
    good = body("0000000001") | {"client_id": "t-1"}
    bad = body("0000000002", vaccinated_on="2021-02-30", dose_number="two") | {"client_id": " t-2 "}
    also_good = body("0000000003") | {"client_id": "t-3"}
    answer = await client.post("/api/v1/doses/batch", json={"doses": [good, bad, also_good]}, headers=CLINIC_HEADERS)
    assert answer.status_code == 200, answer.text
    first, rejected, third = answer.json()["results"]
    assert (first["client_id"], first["status"], third["client_id"], third["status"]) == (
        "t-1",
        "unmatched",
        "t-3",
        "unmatched",
    )
    assert (rejected["client_id"], rejected["status"], rejected["dose_id"]) == ("t-2", "rejected", None)
    error = rejected["error"]
    assert error["error"] == "ValidationError"
    assert sorted(e["field"] for e in error["errors"]) == ["doses[1].dose_number", "doses[1].vaccinated_on"]
    assert "2021-02-30" not in error["detail"]  # the input is never echoed

    # The same batch again: the good items replay, the bad one is rejected again, nothing more is stored.
    again = await client.post("/api/v1/doses/batch", json={"doses": [good, bad, also_good]}, headers=CLINIC_HEADERS)
    assert again.json() == answer.json()


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"client_id": ""}, "doses.1.client_id"),
        ({"client_id": None}, "doses.1.client_id"),
        ({}, "doses.1.client_id"),
    ],
)
async def test_a_batch_item_without_a_usable_client_id_refuses_the_batch(
    client: httpx.AsyncClient, item: dict[str, Any], field: str
) -> None:
    """Nothing would key that item's result, nor match a retry to it: the batch is refused, naming the item."""
    unkeyed = {k: v for k, v in body("0000000002").items()} | item
    good = body("0000000001") | {"client_id": "t-1"}
    answer = await client.post("/api/v1/doses/batch", json={"doses": [good, unkeyed]}, headers=CLINIC_HEADERS)
    assert answer.status_code == 422
    assert [e["field"] for e in answer.json()["errors"]] == [field]


async def test_a_shard_written_on_a_leased_connection_counts_as_touched(client: httpx.AsyncClient) -> None:
    """The dose path writes on a connection of its own, not through a session: the unit of work must still
    name the shard, or the outbox relay is not woken after the commit."""
    app: Any = client._transport.app  # type: ignore[attr-defined]
    async with UnitOfWork(app.state.databases) as uow:
        [outcome] = await record_doses(
            uow,
            principal=CLINIC,
            submissions=[Submission(key="touch", dose=dose("0000000004"))],
            rules=default_rules(),
            today=TODAY,
        )
        assert outcome.accepted is not None
        touched = uow.touched_shards
    assert touched == [await app.state.databases.shard_of("131016")]


async def several_at_once(record: Callable[..., Any], requests: int) -> None:
    """Requests at once that each lease shard connections of their own: batches larger than the statements
    that single doses share (those take one connection at a time for them all)."""
    size = repository.SHARED_STATEMENT_KEYS + 1
    outcomes = await asyncio.gather(
        *(
            record(*(Submission(key=f"many-{n}-{i}", dose=dose(f"1000{n:02d}{i:04d}")) for i in range(size)))
            for n in range(requests)
        )
    )
    assert all(o.accepted is not None for batch in outcomes for o in batch)


async def park_several(databases: RecordsDatabases, database: Any, count: int) -> list[Any]:
    """``count`` of the dose path's leases of ``database`` held at once, then ended: each took a connection of
    its own, and each parks it while there is room. Deterministic, unlike concurrent requests, which may end
    one lease before the next begins and share a connection (as they should)."""
    shard = databases.spare_of(database)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(count):
            await stack.enter_async_context(repository._leased(database, (shard, databases.spare_limit)))
    return [fairy for fairy, _ in shard]


async def test_the_dose_path_keeps_its_connections_between_requests(
    databases: RecordsDatabases, record: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection the dose path used is parked for the next request (not returned to the pool), up to
    ``pool_size`` per database; one parked too long goes back to the pool instead; disposing the databases
    closes them all."""
    [first] = await record(Submission(key="a", dose=dose("0000000001")))
    assert first.accepted is not None and first.accepted.status == "unmatched"
    main, shard = databases.spare_of(databases.main), databases.spare_of(databases.shards["s0"])
    assert len(main) == len(shard) == 1
    parked = shard[0][0].driver_connection
    await record(Submission(key="b", dose=dose("0000000002")))
    assert [f.driver_connection for f, _ in shard] == [parked]  # the same connection served the next one

    # Many requests at once: what they used is parked, never more than pool_size (5 here). How many is up to
    # timing (one may end its lease before another begins); leases held at once park one connection each.
    await several_at_once(record, 8)
    assert databases.spare_limit == 5
    assert 1 <= len(shard) <= 5
    assert len(await park_several(databases, databases.shards["s0"], 5)) == 5  # all the pool has

    # Parked too long: back to the pool, and the request is served by a connection from the pool.
    shard[:] = [(fairy, at - repository.SPARE_IDLE_SECONDS - 1) for fairy, at in shard]
    [late] = await record(Submission(key="d", dose=dose("0000000003")))
    assert late.accepted is not None
    assert len(shard) == 1
    pool: Any = databases.shards["s0"].engine.sync_engine.pool
    assert pool.checkedout() == len(shard)  # the others went back

    await databases.dispose()
    assert not shard and not main
    assert pool.checkedout() == 0


async def test_a_statement_that_fails_does_not_park_its_connection(
    databases: RecordsDatabases, record: Callable[..., Any]
) -> None:
    shard = databases.spare_of(databases.shards["s0"])
    async with databases.shards["s0"].sessionmaker() as session, session.begin():
        await session.execute(text("ALTER TABLE doses ADD CONSTRAINT no_pfizer CHECK (vaccine <> 'pfizer')"))
    with pytest.raises(DBAPIError):
        await record(Submission(key="a", dose=dose("0000000001")))
    assert shard == []
    pool: Any = databases.shards["s0"].engine.sync_engine.pool
    assert pool.checkedout() == 0


async def test_a_lost_connection_takes_the_parked_ones_with_it(
    databases: RecordsDatabases, record: Callable[..., Any]
) -> None:
    """A statement that loses its connection fails the request (503, retryable) and drops every parked
    connection of that database with it (a restarted server closed them all): none is tried again."""
    database = databases.shards["s0"]
    shard = databases.spare_of(database)
    parked = await park_several(databases, database, 4)
    assert len(parked) == 4
    with pytest.raises(OperationalError):
        async with repository._leased(database, (shard, databases.spare_limit)):
            raise ConnectionResetError("the server closed the connection")
    assert shard == []
    assert all(not fairy.is_valid for fairy in parked)
    pool: Any = database.engine.sync_engine.pool
    assert pool.checkedout() == 0
    [again] = await record(Submission(key="b", dose=dose("0000000003")))
    assert again.accepted is not None and again.accepted.status == "unmatched"


async def test_parked_connections_the_server_closed_are_not_used(
    databases: RecordsDatabases, record: Callable[..., Any]
) -> None:
    parked = await park_several(databases, databases.shards["s0"], 4)
    async with databases.main.engine.connect() as conn:
        await conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
            ),
            {"d": make_url(databases.shards["s0"].url).database},
        )
    for _ in range(100):  # until asyncpg has read the server's goodbye on each of them
        if all(fairy.driver_connection.is_closed() for fairy in parked):
            break
        await asyncio.sleep(0.05)
    [outcome] = await record(Submission(key="b", dose=dose("0000000003")))
    assert outcome.accepted is not None and outcome.accepted.status == "unmatched"
    assert all(not fairy.is_valid for fairy in parked)


@pytest.mark.parametrize("route", [DIRECT, DOCUMENTED], ids=["direct", "fastapi"])
async def test_a_double_scan_of_a_municipality_moving_away_is_refused_like_its_other_writes_and_stores_no_key(
    served: tuple[httpx.AsyncClient, Any], route: dict[str, str]
) -> None:
    """A double scan stores only its key (the answer: the first dose). While the municipality is fenced for a
    move, that key would stay on the old shard, to be deleted with the rest: the retry, after the move, would
    be decided again. So it is refused like any write of the municipality, and answered alike; after the
    move it is answered as before."""
    client, app = served
    first = await post(client, body("0000000001"), key="k1", route=route)
    assert first.status_code == 201, first.text
    shard = app.state.databases.shards["s0"]
    async with shard.engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO shard_fences (municipality_code, moving_to, fenced_at) VALUES (:m, 's1', now())"),
            {"m": CHIYODA},
        )
    new = await post(client, body("0000000002"), key="k2", route=route)
    again = await post(client, body("0000000001"), key="k3", route=route)
    assert new.status_code == 503 and new.headers["Retry-After"] == "1", new.text
    assert again.status_code == 503, again.text
    assert (again.headers["Retry-After"], again.json()) == (new.headers["Retry-After"], new.json())
    async with shard.engine.connect() as conn:
        assert (await conn.execute(text("SELECT key FROM idempotency_keys"))).scalars().all() == ["k1"]

    async with shard.engine.begin() as conn:
        await conn.execute(text("DELETE FROM shard_fences"))
    retried = await post(client, body("0000000001"), key="k3", route=route)
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] == "duplicate" and retried.json()["dose_id"] == first.json()["dose_id"]
