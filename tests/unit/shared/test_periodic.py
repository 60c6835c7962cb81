"""A background job: rest, then a pass, for good; a pass that fails is logged and the next one still runs."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from shared.periodic import every_in_background


async def test_a_failed_pass_is_logged_and_the_job_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    passes: list[float] = []
    third = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def job() -> None:
        passes.append(loop.time() - started)
        if len(passes) == 3:
            third.set()
        if len(passes) == 1:
            raise RuntimeError("the database went away")

    task = every_in_background(0.05, job, name="the test job")
    await asyncio.wait_for(third.wait(), timeout=5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert passes[0] >= 0.05  # rest first
    assert [r.getMessage() for r in caplog.records] == ["the test job failed; trying again in 0s"]
    assert task.get_name() == "the test job"


async def test_a_job_may_start_at_once() -> None:
    ran = asyncio.Event()

    async def job() -> None:
        ran.set()

    task = every_in_background(3600, job, name="the sweep", first_after=0)
    await asyncio.wait_for(ran.wait(), timeout=5)  # not an hour
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
