"""Dose CSV imports on real PostgreSQL: stored at once, recorded in the background through the batch path
with row-level results, idempotent by client_id, resumed after a worker stopped, shown only to the sender."""

from __future__ import annotations

import io
import itertools

import pytest
from sqlalchemy import select

from services.records.imports import ImportWorker
from services.records.models import DoseImport
from services.records.service import import_status, record_import_rows, start_import
from shared.auth import Principal, Role
from shared.db import Databases, UnitOfWork
from shared.domain.dose_csv import parse_dose_csv
from shared.domain.vaccines import default_rules
from shared.errors import InvalidField, NotFound
from tests.integration.services.records.records_support import CLINIC, SAPPORO, TODAY, count, line

pytestmark = pytest.mark.usefixtures("pg_server")
HEADER = "client_id,coupon,dose_number,vaccinated_on,vaccine,lot_number,venue,doctor,medical_worker\n"
ROWS = [
    f"r1,{line('0000000001')},1,2021-06-01,pfizer,EY0583,集団接種会場,,false",
    f"r2,{line('0000000001')},2,2021-06-22,pfizer,FA5765,,,",
    f"r3,{line('0000000002', municipality=SAPPORO)},1,2021-06-01,moderna,3000001,,,1",
    "r4,{},1,2021-13-01,pfizer,EY0583,,,".format(line("0000000003")),  # no such date: the file's shape
    f"r5,{line('0000000004')},1,2021-06-01,sputnik,X1,,,",  # unknown product: the dose rules
    f"r6,{line('0000000001')},1,2021-06-01,pfizer,EY0583,二階,,",  # r1 scanned again: a duplicate, not stored
]
FILE = (HEADER + "\n".join(ROWS) + "\n").encode()


async def start(databases: Databases, content: bytes, principal: Principal = CLINIC) -> str:
    async with UnitOfWork(databases) as uow:
        return await start_import(uow, principal=principal, content=content)


async def status(databases: Databases, import_id: str, principal: Principal = CLINIC) -> dict[str, object]:
    async with UnitOfWork(databases) as uow:
        entry = await import_status(uow, principal=principal, import_id=import_id)
        return {
            "status": entry.status,
            "rows_total": entry.rows_total,
            "rows_ok": entry.rows_ok,
            "rows_failed": entry.rows_failed,
            "errors": entry.errors,
        }


async def stored(databases: Databases) -> int:
    return await count(databases, "s0") + await count(databases, "s1")


async def test_an_import_records_its_good_rows_and_reports_each_bad_one(databases: Databases) -> None:
    import_id = await start(databases, FILE)
    assert (await status(databases, import_id))["status"] == "queued"
    assert await ImportWorker(databases, chunk_rows=4).run_once()
    assert await status(databases, import_id) == {
        "status": "done",
        "rows_total": 6,
        "rows_ok": 4,
        "rows_failed": 2,
        "errors": [
            {"row": 5, "field": "vaccinated_on", "message": "2021-13-01 is not a calendar date"},
            {"row": 6, "field": "vaccine", "message": "unknown product code 'sputnik' (known: astrazeneca, "
             "moderna, novavax, pfizer)"},
        ],
    }  # fmt: skip
    assert await stored(databases) == 3
    assert not await ImportWorker(databases).run_once()  # nothing left to do
    # The file is not kept once its import is done: its counts and errors are all that is read.
    async with databases.main.sessionmaker() as session:
        assert await session.scalar(select(DoseImport.content).where(DoseImport.import_id == import_id)) == b""


async def test_the_same_file_again_records_nothing_more(databases: Databases) -> None:
    await start(databases, FILE)
    await ImportWorker(databases).run_once()
    again = await start(databases, FILE)
    await ImportWorker(databases).run_once()
    assert (await status(databases, again))["rows_ok"] == 4
    assert await stored(databases) == 3


async def test_an_import_resumes_after_its_worker_stopped_midway(databases: Databases) -> None:
    import_id = await start(databases, FILE)
    # A worker recorded the first two rows and committed, then its process ended.
    first = list(itertools.islice(parse_dose_csv(io.BytesIO(FILE)), 2))
    async with UnitOfWork(databases) as uow:
        await record_import_rows(
            uow, import_id=import_id, rows=first, rows_total=6, done=False, rules=default_rules(), today=TODAY
        )
    assert (await status(databases, import_id))["rows_ok"] == 2
    assert await ImportWorker(databases, chunk_rows=2).run_once()
    result = await status(databases, import_id)
    assert (result["status"], result["rows_ok"], result["rows_failed"]) == ("done", 4, 2)
    assert await stored(databases) == 3


async def test_only_the_sender_sees_an_import(databases: Databases) -> None:
    import_id = await start(databases, FILE)
    same_clinic_other_tablet = Principal(role=Role.INSTITUTION, subject="tablet-8", institution=CLINIC.institution)
    office = Principal(role=Role.MUNICIPALITY, subject="chiyoda", municipality="131016")
    for stranger in (same_clinic_other_tablet, office):
        with pytest.raises(NotFound):
            await status(databases, import_id, stranger)
    with pytest.raises(NotFound):
        await status(databases, "00000000-0000-0000-0000-000000000000")


async def test_a_file_without_the_required_columns_is_refused_at_once(databases: Databases) -> None:
    with pytest.raises(InvalidField) as refused:
        await start(databases, b"client_id,coupon\nx,1\n")
    assert refused.value.field == "file"
