"""Helpers for records' service-level tests on real PostgreSQL: a main database and two shards, migrated,
with two municipalities pinned to different shards so that every cross-shard rule is exercised."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import date
from typing import Any

from sqlalchemy import func, select

from services.records import repository
from services.records.models import Dose, outbox, shard_assignments
from services.records.schemas import CorrectionIn, DoseIn
from services.records.service import Outcome, Submission, correct_dose, record_doses
from services.records.settings import RecordsSettings
from shared.auth import Principal, Role
from shared.db import Databases, UnitOfWork, utcnow
from shared.domain.coupon import compose_coupon_line
from shared.domain.vaccines import default_rules
from shared.events import DoseEvent, dose_events_from_bytes
from shared.migrations import SERVICES_DIR

TREES = SERVICES_DIR / "records" / "migrations"
CHIYODA, SAPPORO = "131016", "011002"  # pinned to shards s0 and s1
TODAY = date(2021, 12, 1)
CLINIC = Principal(role=Role.INSTITUTION, subject="tablet-7", institution="1312345678")
CHIYODA_OFFICE = Principal(role=Role.MUNICIPALITY, subject="chiyoda", municipality=CHIYODA)


def line(coupon_number: str, *, municipality: str = CHIYODA, dose_number: int = 0) -> str:
    return compose_coupon_line(
        kind=1, dose_number=dose_number, municipality_code=municipality, coupon_number=coupon_number
    )


def dose(coupon_number: str, **changes: Any) -> DoseIn:
    municipality = changes.pop("municipality", CHIYODA)
    fields: dict[str, Any] = {
        "coupon": line(coupon_number, municipality=municipality),
        "dose_number": 1,
        "vaccinated_on": date(2021, 6, 1),
        "vaccine": "pfizer",
        "lot_number": "EY0583",
    }
    return DoseIn.model_validate(fields | changes)


async def records_databases(make_database: Callable[..., str]) -> AsyncIterator[Databases]:
    main = make_database("records_main", TREES / "main")
    s0, s1 = make_database("records_s0", TREES / "shard"), make_database("records_s1", TREES / "shard")
    dbs = repository.connect(main, {"s0": s0, "s1": s1}, pool_size=5)
    await pin_municipalities(dbs)
    yield dbs
    await dbs.dispose()


async def pin_municipalities(databases: Databases) -> None:
    """Chiyoda to shard s0, Sapporo to s1."""
    async with databases.main.sessionmaker() as session, session.begin():
        await session.execute(
            shard_assignments.insert(),
            [
                {"municipality_code": CHIYODA, "shard": "s0", "assigned_at": utcnow()},
                {"municipality_code": SAPPORO, "shard": "s1", "assigned_at": utcnow()},
            ],
        )


def serving_settings(databases: Databases, **overrides: Any) -> RecordsSettings:
    """records' settings on these databases with no relay, consumer or import worker of its own: the app serves
    requests only (a test drives the rest itself)."""
    return RecordsSettings(
        main_dsn=databases.main.url,
        shard_dsns={name: db.url for name, db in databases.shards.items()},
        run_relay=False,
        run_consumer=False,
        run_imports=False,
        pool_size=5,
        **overrides,
    )


def recorder(databases: Databases) -> Callable[..., Any]:
    """``await record(Submission(...), ..., principal=CLINIC)``: one request's worth, committed."""

    async def go(*submissions: Submission, principal: Principal = CLINIC, today: date = TODAY) -> list[Outcome]:
        async with UnitOfWork(databases) as uow:
            return await record_doses(
                uow, principal=principal, submissions=list(submissions), rules=default_rules(), today=today
            )

    return go


async def doses_in(databases: Databases, shard: str) -> list[Dose]:
    async with databases.shards[shard].sessionmaker() as session:
        return list((await session.execute(select(Dose).order_by(Dose.recorded_at))).scalars())


async def events_in(databases: Databases, shard: str) -> list[DoseEvent]:
    async with databases.shards[shard].sessionmaker() as session:
        rows = (await session.execute(select(outbox.c.payload).order_by(outbox.c.id))).scalars()
        return [event for payload in rows for event in dose_events_from_bytes(payload)]


async def count(databases: Databases, shard: str) -> int:
    async with databases.shards[shard].sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(Dose)) or 0)


async def correct(databases: Databases, dose_id: str, correction: CorrectionIn) -> None:
    """Chiyoda's office corrects (or voids) one of its doses."""
    async with UnitOfWork(databases) as uow:
        await correct_dose(
            uow,
            principal=CHIYODA_OFFICE,
            municipality_code=CHIYODA,
            dose_id=dose_id,
            correction=correction,
            rules=default_rules(),
            today=TODAY,
        )
