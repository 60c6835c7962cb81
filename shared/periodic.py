"""A job a service runs in the background every so often (a sweep, an expiry, a purge), for good; and its ``vrs``
command, to run it as a worker of its own or one pass from a shell."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

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


def add_pass_command(commands: Any, name: str, help: str, run: Callable[..., Coroutine[Any, Any, int]]) -> None:
    """``vrs … NAME [--once]``: ``run(once=…)`` — the job as a worker of its own (then set the API replicas'
    interval to 0), or one pass that prints what it did."""
    parser = commands.add_parser(name, help=help)
    parser.add_argument("--once", action="store_true", help="one pass, print what it did, exit")
    parser.set_defaults(func=lambda args: asyncio.run(run(once=args.once)))
