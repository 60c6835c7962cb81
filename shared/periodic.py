"""A job a service runs in the background every so often (an expiry, a purge), for good."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(interval: float, job: Callable[[], Awaitable[None]], *, name: str) -> None:
    """``interval`` seconds' rest, then ``job()``, for good; passes never overlap. Rest first: a process starting
    is busy enough, and such jobs' windows are days. A pass that fails is logged and tried again at the next."""
    while True:
        await asyncio.sleep(interval)
        try:
            await job()
        except Exception:
            log.exception("%s failed; trying again in %.0fs", name, interval)


def every_in_background(interval: float, job: Callable[[], Awaitable[None]], *, name: str) -> asyncio.Task[None]:
    """:func:`every` as a task of the running loop (cancel it to stop)."""
    return asyncio.create_task(every(interval, job, name=name), name=name)
