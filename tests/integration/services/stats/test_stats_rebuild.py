"""``vrs stats rebuild``: the topic replayed into a shadow table and swapped in atomically while the live
consumer and the API go on; the result equals the live aggregates (and repairs a damaged one)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import httpx
from fastapi import FastAPI
from sqlalchemy import insert, select

from services.stats.consumer import StatsConsumer
from services.stats.models import LIVE, consumer_offsets, dose_counts
from services.stats.rebuild import rebuild
from services.stats.repository import _cell_values as cell_values
from services.stats.service import fold_deltas
from services.stats.settings import StatsSettings
from shared.db import Database
from shared.events import DoseEvent, DoseEventType
from shared.settings import BusSettings
from tests.factories import cell, recorded
from tests.integration.services.stats.conftest import assert_rollups_match
from tests.integration.services.stats.test_stats_consumer import counts, key, publish

ROOT = Path(__file__).resolve().parents[4]


def history(n: int) -> list[DoseEvent]:
    """Doses in a few cells, every third corrected to dose 2 and every fifth voided afterwards."""
    out: list[DoseEvent] = []
    for i in range(n):
        first = recorded(date=cell().date.replace(day=1 + i % 5), sex="MF"[i % 2])
        out.append(first)
        assert first.cell is not None
        if i % 3 == 0:
            moved = first.cell.model_copy(update={"dose_number": 2})
            out.append(
                DoseEvent(
                    type=DoseEventType.CORRECTED,
                    dose_id=first.dose_id,
                    municipality=first.municipality,
                    cell=moved,
                    previous_cell=first.cell,
                )
            )
        elif i % 5 == 0:
            out.append(
                DoseEvent(
                    type=DoseEventType.VOIDED,
                    dose_id=first.dose_id,
                    municipality=first.municipality,
                    cell=None,
                    previous_cell=first.cell,
                )
            )
    return out


def expected(events: list[DoseEvent]) -> dict[tuple[object, ...], int]:
    return {key(c): n for c, n in fold_deltas(events).items()}


async def settle(database: Database, messages: int, timeout: float = 60) -> None:
    """Until the live consumer's committed offsets cover every message published."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with database.sessionmaker() as session:
            stmt = select(consumer_offsets.c.next_offset).where(consumer_offsets.c.consumer == "stats")
            done = sum(int(o) for o in (await session.execute(stmt)).scalars())
        if done >= messages:
            return
        assert asyncio.get_running_loop().time() < deadline, f"live consumer at {done} of {messages}"
        await asyncio.sleep(0.05)


async def test_rebuild_swaps_in_aggregates_equal_to_the_live_ones_while_the_api_answers(
    app: FastAPI, client: httpx.AsyncClient, bus: BusSettings, stats_dsn: str
) -> None:
    database: Database = app.state.databases.main
    first = history(150)
    await publish(bus, first)
    live = StatsConsumer(database, bus=bus, group="stats", poll_timeout=0.1, max_records=40)
    live.start()
    try:
        await settle(database, len(first))
        assert await counts(database) == expected(first)
        # A damaged aggregate (a bug, a hand edit): the rebuild must recompute, not copy.
        async with database.sessionmaker() as session, session.begin():
            await session.execute(insert(dose_counts).values(**cell_values(cell(vaccine="bogus")), count=99))
            await session.execute(insert(LIVE.rollups[0]).values(date=date(2020, 1, 1), dose_number=1, count=7))
        assert await counts(database) != expected(first)

        answered: list[int] = []
        done = asyncio.Event()

        async def read_meanwhile() -> None:
            while not done.is_set():
                answered.append((await client.get("/api/v1/stats/doses", params={"group_by": "date"})).status_code)
                await asyncio.sleep(0.01)

        second = history(40)
        reader = asyncio.create_task(read_meanwhile())
        settings = StatsSettings(main_dsn=stats_dsn, bus=bus)
        rebuilding = asyncio.create_task(rebuild(database, settings, idle=0.2, max_records=50))
        await publish(bus, second)  # the live consumer goes on while the rebuild runs
        result = await rebuilding
        done.set()
        await reader
        assert result.events_applied > 0
        assert answered and set(answered) == {200}, answered

        await settle(database, len(first) + len(second))
        await asyncio.sleep(0.5)  # anything applied twice would show now
        assert await counts(database) == expected(first + second)
        await assert_rollups_match(database)  # rebuilt too, the damaged one included
    finally:
        await live.stop()

    # The command does the same from the shell; the counts come out the same.
    env = {
        "VRS_STATS_MAIN_DSN": stats_dsn,
        "VRS_BUS_KIND": "embedded",
        "VRS_BUS_EMBEDDED_PATH": str(bus.embedded_path),
        "VRS_BUS_TOPIC": bus.topic,
        "VRS_BUS_PARTITIONS": str(bus.partitions),
        "PYTHONPATH": str(ROOT),
    }
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "shared.cli", "stats", "rebuild", "--idle", "0.2"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "rebuilt from" in out.stdout
    assert await counts(database) == expected(first + second)
