"""stats' HTTP surface: cuts of the aggregates, the open-data files and the dashboard (all contract paths)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from services.stats import service
from services.stats.dashboard import DASHBOARD, ECHARTS_ASSET, Script, unavailable_page
from services.stats.schemas import CoverageOut, DosesOut
from services.stats.settings import StatsSettings
from shared.auth import PrincipalDep
from shared.db import Database
from shared.errors import InvalidField, NotFound, ServiceUnavailable, Unauthorized, responses

router = APIRouter(tags=["stats"])

GroupBy = Annotated[
    str | None,
    Query(
        max_length=200,
        description="comma-separated dimensions, kept in this order in each row: date, prefecture, "
        "municipality, sex, age_band (-64, 65-, UNK), age_band_10 (0-9, 10-19 … 80-89, 90-, UNK), medical_worker, "
        "dose_number, vaccine; empty for one total row",
        examples=["date,prefecture"],
    ),
]
DateParam = Annotated[str | None, Query(max_length=10, description="vaccination date YYYY-MM-DD, inclusive")]


def _database(request: Request) -> Database:
    database: Database = request.app.state.databases.main
    return database


@router.get(
    "/api/v1/stats/doses",
    response_model=DosesOut,
    responses=responses(Unauthorized, InvalidField),
    summary="Doses by any combination of dimensions",
)
async def get_doses(
    request: Request,
    principal: PrincipalDep,
    group_by: GroupBy = None,
    date_from: Annotated[DateParam, Query(alias="from")] = None,
    date_to: Annotated[DateParam, Query(alias="to")] = None,
    prefecture: Annotated[str | None, Query(max_length=2, description="2-digit prefecture code")] = None,
    municipality: Annotated[str | None, Query(max_length=6, description="6-digit municipality code")] = None,
    limit: Annotated[int | None, Query(ge=1, description="rows per page (default and most: 50,000)")] = None,
    offset: Annotated[int, Query(ge=0, description="rows to skip: the next_offset of the previous page")] = 0,
) -> StreamingResponse:
    """Anyone may cut by every dimension. Cuts finer than the open data (by municipality, vaccine or 10-year
    age band) hide counts 1-9 — and what would reveal them — as null, except for role national."""
    settings: StatsSettings = request.app.state.settings
    dimensions = service.parse_group_by(group_by)
    where = service.parse_filter(date_from=date_from, date_to=date_to, prefecture=prefecture, municipality=municipality)
    if limit is not None and limit > settings.max_cut_rows:
        raise InvalidField("limit", f"must be at most {settings.max_cut_rows}")
    suppress = service.suppression_for(
        principal, group_by=dimensions, where=where, threshold=settings.small_cell_threshold
    )
    chunks = service.dose_cut(
        _database(request),
        group_by=dimensions,
        where=where,
        suppress_below=suppress,
        limit=limit or settings.max_cut_rows,
        offset=offset,
        cache=request.app.state.answers,
    )
    return await _streamed(chunks, media_type="application/json")


@router.get(
    "/api/v1/stats/coverage",
    response_model=CoverageOut,
    responses=responses(InvalidField, ServiceUnavailable),
    summary="接種率: people with at least dose N over the population, nationally or by prefecture",
)
async def get_coverage(
    request: Request,
    prefecture: Annotated[
        str | None, Query(max_length=2, description="2-digit prefecture code; absent: national")
    ] = None,
    group_by: Annotated[
        str | None, Query(max_length=20, description="'prefecture' for one set of rows per prefecture")
    ] = None,
) -> Response:
    """Public: prefecture-level and national figures only."""
    place, by_prefecture = service.parse_coverage_query(prefecture=prefecture, group_by=group_by)
    answer = await service.coverage(
        _database(request),
        population=request.app.state.population,
        prefecture=place,
        by_prefecture=by_prefecture,
        cache=request.app.state.answers,
    )
    # Serialised once by the service (and maybe cached): CoverageOut is its shape (response_model, for the docs).
    return Response(answer, media_type="application/json")


async def _streamed(chunks: AsyncGenerator[bytes, None], *, media_type: str) -> StreamingResponse:
    # The query runs before the response starts, so a database that is down gets an error status, not a
    # 200 with an empty or truncated body.
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    return StreamingResponse(body(), media_type=media_type)


@router.get(
    "/api/v1/opendata/prefecture.ndjson",
    response_class=StreamingResponse,
    responses={200: {"content": {service.NDJSON_MEDIA_TYPE: {}}, "description": "one JSON object per line"}},
    summary="The Digital Agency's prefecture.ndjson, byte for byte",
)
async def prefecture_ndjson(request: Request) -> StreamingResponse:
    return await _streamed(service.prefecture_ndjson(_database(request)), media_type=service.NDJSON_MEDIA_TYPE)


@router.get(
    "/api/v1/opendata/summary_by_date.csv",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "date,count_first_or_mid_general,..."}},
    summary="The Digital Agency's summary_by_date.csv format",
)
async def summary_by_date_csv(request: Request) -> StreamingResponse:
    return await _streamed(service.summary_by_date_csv(_database(request)), media_type=service.CSV_MEDIA_TYPE)


@router.get("/dashboard", response_class=HTMLResponse, summary="The statistics dashboard (Japanese)")
async def dashboard(request: Request) -> HTMLResponse:
    if isinstance(request.app.state.echarts, str):  # without its chart library the page would be empty
        page = unavailable_page()
        return HTMLResponse(page.html, status_code=503, headers=page.headers)
    return HTMLResponse(DASHBOARD.html, headers=DASHBOARD.headers)


@router.get("/dashboard/{asset}", include_in_schema=False)
async def dashboard_asset(request: Request, asset: str) -> Response:
    script = request.app.state.echarts
    if asset != ECHARTS_ASSET or not isinstance(script, Script):
        raise NotFound("no such file")
    return Response(script.body, media_type="text/javascript; charset=utf-8", headers=script.headers)
