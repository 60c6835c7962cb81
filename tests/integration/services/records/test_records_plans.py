"""The dose hot path's statements stay index probes in the plans PostgreSQL actually runs.

asyncpg prepares each statement once per connection, and after a few executions PostgreSQL settles on a
*generic* plan, made without the parameters' values (an array is guessed at ten elements). If such a plan
joins the wanted keys or coupons to a whole table, every dose costs a scan that grows with the table: at a few
thousand rows it was a third of the database's CPU under load. So each statement is explained here as a
generic plan over tables big enough for a scan to look tempting, and every table must be reached through an
index, once per wanted key or coupon.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import insert, text

from services.records.models import CouponProjection
from services.records.repository import _CLAIM_PG, _CLAIMED_PG, _ON_FILE_PG
from services.records.service import Submission
from shared.db import Databases, utcnow
from tests.integration.services.records.records_support import CHIYODA, CLINIC, TREES, dose

ROWS = 3000


def _migration(name: str) -> Any:
    """A shard migration of records, for a statement its function runs (explained here on its own)."""
    path = TREES / "shard" / "versions" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_check(query: str, *names: str) -> str:
    """One query of records_writes_as_read (migration 20261127_03), its arguments as ``$1``, ``$2``, ..."""
    sql = getattr(_migration("20261127_03_writes_check_dose_versions"), query)
    for n, name in enumerate(names, start=1):
        sql = re.sub(rf"\b{name}\b", f"${n}", sql)
    return str(sql)


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


async def _plan(databases: Databases, database: str, types: str, sql: str, args: str) -> list[dict[str, Any]]:
    """The plan a records connection runs ``sql`` with, from its second execution on (asyncpg's prepared
    statements are prepared once per connection, as this one is); it must be the generic plan, made once."""
    db = databases.main if database == "main" else databases.shards[database]
    async with db.engine.connect() as conn:
        await conn.exec_driver_sql(f"PREPARE hot({types}) AS {sql}")
        try:
            await conn.exec_driver_sql("BEGIN")  # the claim inserts: explained, then rolled back
            explain = f"EXPLAIN (FORMAT JSON) EXECUTE hot({args})"
            for _ in range(2):
                raw = (await conn.exec_driver_sql(explain)).scalar_one()
            planned = (
                await conn.exec_driver_sql("SELECT custom_plans FROM pg_prepared_statements WHERE name = 'hot'")
            ).one()
        finally:
            await conn.exec_driver_sql("ROLLBACK")
            await conn.exec_driver_sql("DEALLOCATE hot")
    assert planned.custom_plans == 0, "planned again at each execution, not once per connection"
    [explained] = json.loads(raw) if isinstance(raw, str) else raw
    return list(_nodes(explained["Plan"]))


@pytest.fixture
async def busy(databases: Databases, record: Any) -> Databases:
    """Thousands of one caller's keys, coupons and doses in shard s0, the statistics taken when there were a
    few dozen (as after a quiet start: autovacuum analyses a table again only after a fifth of it changed)."""
    numbers = [f"{n:010d}" for n in range(1, ROWS + 1)]
    for part, analyse in ((numbers[:30], True), (numbers[30:], False)):
        async with databases.shards["s0"].sessionmaker() as session, session.begin():
            await session.execute(
                insert(CouponProjection),
                [
                    {"municipality_code": CHIYODA, "coupon_number": n, "resident_id": f"r{n}", "sex": "F"}
                    | {"version": 1, "updated_at": utcnow()}
                    for n in part
                ],
            )
        outcomes = await record(*(Submission(key=f"k{n}", dose=dose(n)) for n in part))
        assert all(o.accepted is not None for o in outcomes)
        if analyse:
            for db in (databases.main, databases.shards["s0"]):
                async with db.engine.connect() as conn:
                    await conn.execute(text("ANALYZE"))
    return databases


@pytest.mark.parametrize(
    ("database", "types", "sql", "args"),
    [
        pytest.param(
            "main", "varchar[], varchar[], varchar[], varchar[], timestamptz[]", _CLAIM_PG,
            "ARRAY['{scope}'], ARRAY['k0000000007'], ARRAY['h'], ARRAY['s0'], ARRAY[now()]", id="claim",
        ),
        pytest.param(
            "main", "varchar[], varchar[]", _CLAIMED_PG, "ARRAY['{scope}'], ARRAY['k0000000007']", id="claimed"
        ),
        pytest.param(
            "s0", "varchar[], varchar[], varchar[], varchar[]", _ON_FILE_PG,
            f"ARRAY['{{scope}}'], ARRAY['{CHIYODA}'], ARRAY['0000000007'], ARRAY['k0000000007']", id="on-file",
        ),
        pytest.param(
            "s0", "integer[], varchar[], varchar[]",
            _write_check("ON_FILE", "coupon_members", "municipalities", "coupon_numbers"),
            f"ARRAY[0], ARRAY['{CHIYODA}'], ARRAY['0000000007']", id="write-check-on-file",
        ),
        pytest.param(
            "s0", "integer[], varchar[], varchar[], integer[]",
            _write_check("HOLDERS_CHANGED", "coupon_members", "municipalities", "coupon_numbers", "holder_versions"),
            f"ARRAY[0], ARRAY['{CHIYODA}'], ARRAY['0000000007'], ARRAY[1]", id="write-check-holders-changed",
        ),
        pytest.param(
            "s0", "integer[], varchar[], varchar[]",
            _write_check("KEYS_ANSWERED", "key_members", "key_scopes", "answered"),
            "ARRAY[0], ARRAY['{scope}'], ARRAY['k0000000007']", id="write-check-keys-answered",
        ),
        pytest.param(
            "s0",
            "integer, integer[], varchar[], varchar[], integer[], integer[], varchar[], integer[], integer[], "
            "varchar[], varchar[]",
            _write_check(
                "PASSED", "members", "coupon_members", "municipalities", "coupon_numbers", "holder_versions",
                "seen_members", "seen", "seen_versions", "key_members", "key_scopes", "answered",
            ),
            f"1, ARRAY[0], ARRAY['{CHIYODA}'], ARRAY['0000000007'], ARRAY[1], ARRAY[0], ARRAY['x'], "
            "ARRAY[1], ARRAY[0], ARRAY['{scope}'], ARRAY['k0000000007']",
            id="write-check",
        ),
    ],
)  # fmt: skip
async def test_each_hot_statement_probes_an_index_per_wanted_row(
    busy: Databases, database: str, types: str, sql: str, args: str
) -> None:
    nodes = await _plan(busy, database, types, sql, args.format(scope=CLINIC.scope_key))
    probes = {}
    for node in nodes:
        if "Relation Name" not in node:
            continue
        condition = node.get("Index Cond", "")
        if node["Node Type"] == "Bitmap Heap Scan":
            condition = " ".join(child.get("Index Cond", "") for child in node.get("Plans", []))
        probes[node["Relation Name"]] = condition
    assert probes, "the plan reads no table at all"
    # The column naming the one row (or the one coupon's rows) wanted must be in the index condition: a scan
    # of every key of the caller's scope, or of a whole table, is what this guards against.
    unprobed = {t: c for t, c in probes.items() if not re.search(r"\(\(?(key|coupon_number|dose_id)\)?(::text)? = ", c)}
    assert not unprobed, f"tables not probed by the wanted row's key: {unprobed}"
    assert not [n["Node Type"] for n in nodes if n["Node Type"] in ("Hash Join", "Merge Join")]
    # Nor a row compared with a whole array (``NOT (dose_id = ANY(seen))``, planned as ``<> ALL``): a linear
    # search per row, quadratic in a batch (a thousand third doses: four million comparisons, half its write).
    assert not [n["Filter"] for n in nodes if re.search(r"\b(ANY|ALL) \(", n.get("Filter", ""))]
