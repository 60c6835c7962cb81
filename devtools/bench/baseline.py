"""The ceiling ``devtools.bench`` compares VRS with (PERFORMANCE.md): the least a dose POST can cost here.

One FastAPI process, a pydantic body, one asyncpg ``INSERT ... RETURNING`` per request on a pool of 20 — no
gateway, no registry lookup, no outbox. ``/api/v1/doses/batch`` is the batch ceiling: the items validated, one
multi-row ``INSERT`` (``unnest`` of one array per column) per request, ids returned. It answers on VRS's own
path, so a gateway can front it too.
Run by the bench as ``uvicorn devtools.bench.baseline:app`` with ``VRS_BENCH_BASELINE_DSN`` set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from fastapi import FastAPI, Request, status
from pydantic import BaseModel, ConfigDict, Field

POOL_SIZE = 20

_TABLE = """
CREATE TABLE IF NOT EXISTS doses (
    id bigserial PRIMARY KEY,
    coupon text NOT NULL,
    dose_number integer NOT NULL,
    vaccinated_on date NOT NULL,
    vaccine text NOT NULL,
    lot_number text NOT NULL,
    venue text,
    doctor text,
    medical_worker boolean NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
)
"""
_INSERT = (
    "INSERT INTO doses (coupon, dose_number, vaccinated_on, vaccine, lot_number, venue, doctor, medical_worker)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id"
)


class DoseIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    coupon: str = Field(min_length=18, max_length=18)
    dose_number: int
    vaccinated_on: date
    vaccine: str
    lot_number: str = Field(min_length=1, max_length=20)
    venue: str | None = Field(default=None, max_length=30)
    doctor: str | None = Field(default=None, max_length=20)
    medical_worker: bool = False


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    dsn = os.environ["VRS_BENCH_BASELINE_DSN"]
    pool = await asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)
    try:
        async with pool.acquire() as connection:
            await connection.execute(_TABLE)
        app.state.pool = pool
        yield
    finally:
        await pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/api/v1/doses", status_code=status.HTTP_201_CREATED)
async def record_dose(body: DoseIn, request: Request) -> dict[str, Any]:
    row = await request.app.state.pool.fetchrow(
        _INSERT,
        body.coupon,
        body.dose_number,
        body.vaccinated_on,
        body.vaccine,
        body.lot_number,
        body.venue,
        body.doctor,
        body.medical_worker,
    )
    return {"dose_id": str(row["id"]), "status": "recorded", "findings": []}


_INSERT_MANY = (
    "INSERT INTO doses (coupon, dose_number, vaccinated_on, vaccine, lot_number, venue, doctor, medical_worker)"
    " SELECT * FROM unnest($1::text[], $2::int[], $3::date[], $4::text[], $5::text[], $6::text[], $7::text[],"
    " $8::bool[]) RETURNING id"
)


class BatchItem(DoseIn):
    client_id: str = Field(min_length=1, max_length=100)


class BatchIn(BaseModel):
    doses: list[BatchItem] = Field(min_length=1, max_length=1000)


@app.post("/api/v1/doses/batch")
async def record_batch(body: BatchIn, request: Request) -> dict[str, Any]:
    items = body.doses
    rows = await request.app.state.pool.fetch(
        _INSERT_MANY,
        [d.coupon for d in items],
        [d.dose_number for d in items],
        [d.vaccinated_on for d in items],
        [d.vaccine for d in items],
        [d.lot_number for d in items],
        [d.venue for d in items],
        [d.doctor for d in items],
        [d.medical_worker for d in items],
    )
    return {
        "results": [
            {"client_id": d.client_id, "dose_id": str(row["id"]), "status": "recorded", "findings": []}
            for d, row in zip(items, rows, strict=True)
        ]
    }
