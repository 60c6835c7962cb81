"""Builders shared by tests: one place that knows what a typical statistics cell and dose event look like, and
the one way tests authenticate to a service (the gateway's internal token)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any, NoReturn

import pytest
import sqlalchemy

from devtools.tokens import dev_gateway_issuer
from shared.auth import Principal, Role
from shared.domain.age import AgeBand
from shared.events import DoseEvent, DoseEventType, StatsCell
from shared.migrations import upgrade

# What the gateway would forward, signed with the development gateway key the services trust in tests.
_GATEWAY = dev_gateway_issuer()


def internal_token(
    role: Role,
    *,
    subject: str | None = None,
    municipality: str | None = None,
    institution: str | None = None,
    ttl_seconds: int | None = None,
) -> str:
    """A raw internal token for ``role`` (what the gateway puts in ``Authorization`` after ``Bearer``)."""
    principal = Principal.named(role, subject=subject, municipality=municipality, institution=institution)
    return _GATEWAY.mint(principal, ttl_seconds=ttl_seconds)


class InternalHeaders(Mapping[str, str]):
    """``{"Authorization": "Bearer <internal token>"}`` that never goes stale.

    Internal tokens live minutes; headers made once at import would expire in a long test run. The token is
    taken from the issuer on every read, which reuses one per caller for half its life.
    """

    def __init__(self, principal: Principal) -> None:
        self._principal = principal

    def __getitem__(self, key: str) -> str:
        if key != "Authorization":
            raise KeyError(key)
        return _GATEWAY.authorization(self._principal)

    def __iter__(self) -> Iterator[str]:
        return iter(("Authorization",))

    def __len__(self) -> int:
        return 1

    def __or__(self, other: Mapping[str, str]) -> dict[str, str]:
        return {**self, **other}

    def __ror__(self, other: Mapping[str, str]) -> dict[str, str]:
        return {**other, **self}


def internal_headers(
    role: Role, *, subject: str | None = None, municipality: str | None = None, institution: str | None = None
) -> InternalHeaders:
    """``{"Authorization": ...}`` for calling a service in-process as the gateway would forward ``role``."""
    return InternalHeaders(Principal.named(role, subject=subject, municipality=municipality, institution=institution))


# The stats tests' ``add_cells`` fixture: change counts as the consumer would.
AddCells = Callable[[Mapping[StatsCell, int]], Awaitable[None]]


def cell(**changes: Any) -> StatsCell:
    """A cell of 千代田区 on 2021-06-01 (female, under 65, dose 1, Pfizer), with ``changes`` applied."""
    fields: dict[str, Any] = {
        "date": date(2021, 6, 1),
        "prefecture": "13",
        "municipality": "131016",
        "sex": "F",
        "age_band": AgeBand.UNDER_65,
        "medical_worker": False,
        "dose_number": 1,
        "vaccine": "pfizer",
    }
    fields.update(changes)
    return StatsCell(**fields)


def recorded(new: StatsCell | None = None, **changes: Any) -> DoseEvent:
    new = new or cell(**changes)
    return DoseEvent(
        type=DoseEventType.RECORDED, dose_id=uuid.uuid4(), municipality=new.municipality, cell=new, previous_cell=None
    )


def run_upgrade(url: str, tree: Path) -> None:
    """:func:`shared.migrations.upgrade` from any thread, one with a running event loop included (alembic runs a loop
    of its own): in a thread of its own, waited for."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(upgrade, url, tree).result()


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose server, tool or package cannot be had here; fail it on CI, where every test must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: every test must run)", pytrace=False)
    pytest.skip(reason)


def team_data(relative: str) -> Path:
    """A file of the team folder's ``data/`` (``VRS_SHARED_DATA``, default ``../shared/data``), read in place.

    Absent in a plain clone: the test is skipped. Always present on CI: there its absence fails the test.
    """
    override = os.environ.get("VRS_SHARED_DATA")
    root = Path(override) if override else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    path = root / relative
    if not path.is_file():
        unavailable(f"{path} not found (set VRS_SHARED_DATA to the team folder's data/)")
    return path


async def vrs_command(*args: str, env: Mapping[str, str]) -> str:
    """``vrs ARGS`` as an operator runs it, in a process of its own with ``env`` added to this one's; its
    standard output (it must exit 0)."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "shared.cli", *args],
        env=os.environ | dict(env),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of ``name`` with exactly ``labels`` in Prometheus' text format (labels in any order)."""
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and match[1] == name and dict(re.findall(r'(\w+)="([^"]*)"', match[2] or "")) == labels:
            return float(match[3])
    return None


async def run_sql(db: Any, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
    """``sql`` in a transaction of its own on ``db`` (a test's bulk fill: ``INSERT … SELECT … generate_series``)."""
    async with db.sessionmaker() as session, session.begin():
        await session.execute(sqlalchemy.text(sql), parameters or {})


async def explained(db: Any, table: str, statement: Any) -> str:
    """PostgreSQL's plan (``EXPLAIN``, text) of ``statement`` (its parameters written in), over ``table`` freshly
    vacuumed and analyzed."""
    async with db.engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.execute(sqlalchemy.text(f"VACUUM ANALYZE {table}"))
        compiled = statement.compile(connection.engine, compile_kwargs={"literal_binds": True})
        return "\n".join((await connection.execute(sqlalchemy.text(f"EXPLAIN {compiled}"))).scalars())
