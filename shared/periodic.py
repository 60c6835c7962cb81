"""A job a service runs in the background every so often (a sweep, an expiry, a purge), for good; and its ``vrs``
command, to run it as a worker of its own or one pass from a shell."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from shared.observability import setup_worker, stop_on_signals
from shared.settings import ServiceSettings

log = logging.getLogger(__name__)


async def every(
    interval: float, job: Callable[[], Awaitable[None]], *, name: str, first_after: float | None = None
) -> None:
    """``job()`` every ``interval`` seconds, for good; passes never overlap. The first after ``first_after``
    seconds (default: ``interval`` — a process starting is busy enough, and a retention's window is days). A pass
    that fails is logged and tried again at the next."""
    delay = interval if first_after is None else first_after
    while True:
        await asyncio.sleep(delay)
        delay = interval
        try:
            await job()
        except Exception:
            log.exception("%s failed; trying again in %.0fs", name, interval)


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel each task (None: one that was not started) and wait for it to end, in order: a service stopping its
    background jobs."""
    for task in tasks:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def every_in_background(
    interval: float, job: Callable[[], Awaitable[None]], *, name: str, first_after: float | None = None
) -> asyncio.Task[None]:
    """:func:`every` as a task of the running loop (cancel it to stop)."""
    return asyncio.create_task(every(interval, job, name=name, first_after=first_after), name=name)


async def work_until_stopped(
    settings: ServiceSettings,
    service: str,
    interval: float,
    job: Callable[[], Awaitable[None]],
    *,
    name: str,
    first_after: float | None = None,
) -> None:
    """:func:`every` as a worker process of its own (``vrs … NAME`` without ``--once``): JSON log lines and
    ``/metrics`` on ``VRS_<SERVICE>_METRICS_PORT`` as every worker's (:func:`setup_worker`), until SIGTERM or
    SIGINT. A pass under way is then abandoned; the batches it committed stay, and the next worker goes on."""
    setup_worker(service=service, log_level=settings.log_level, metrics_port=settings.metrics_port)
    stop = stop_on_signals()
    task = every_in_background(interval, job, name=name, first_after=first_after)
    log.info("%s: a pass every %gs", name, interval)
    try:
        await stop.wait()
    finally:
        await cancel_and_wait(task)


def add_pass_command(commands: Any, name: str, help: str, run: Callable[..., Coroutine[Any, Any, int]]) -> None:
    """``vrs … NAME [--once]``: ``run(once=…)`` — the job as a worker of its own (then set the API replicas'
    interval to 0), or one pass that prints what it did."""
    parser = commands.add_parser(name, help=help)
    parser.add_argument("--once", action="store_true", help="one pass, print what it did, exit")
    parser.set_defaults(func=lambda args: asyncio.run(run(once=args.once)))
