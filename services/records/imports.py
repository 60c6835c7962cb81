"""The dose CSV import worker: records queued imports in the background, chunk by chunk, resuming after a
restart from the last chunk committed. Several replicas may run one each: an import is leased to one worker
at a time (``lease_until``, renewed with every chunk; a worker that died lets its lease run out)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
from collections.abc import Callable
from datetime import timedelta

from services.records import service
from services.records.repository import ImportRepository
from shared.db import Databases, UnitOfWork, utcnow
from shared.domain.dose_csv import parse_dose_csv
from shared.domain.japan_time import japan_today
from shared.domain.vaccines import default_rules

log = logging.getLogger(__name__)


class ImportWorker:
    def __init__(
        self,
        databases: Databases,
        *,
        chunk_rows: int = 1000,
        idle_seconds: float = 2.0,
        lease: timedelta = timedelta(seconds=60),
        after_commit: Callable[[UnitOfWork], None] | None = None,
    ) -> None:
        self._databases = databases
        self._chunk_rows = chunk_rows
        self._idle = idle_seconds
        self._lease = lease
        self._after_commit = after_commit
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """An import was queued in this process: start at once instead of at the next idle look."""
        self._wake.set()

    async def take_next(self) -> str | None:
        async with self._databases.main.sessionmaker() as session, session.begin():
            return await ImportRepository(session).take_next(now=utcnow(), lease=self._lease)

    async def run_once(self) -> bool:
        """Process one import to its end, if one is waiting; whether one was."""
        import_id = await self.take_next()
        if import_id is None:
            return False
        await self.process(import_id)
        return True

    async def process(self, import_id: str) -> None:
        async with self._databases.main.sessionmaker() as session:
            entry = await ImportRepository(session).get(import_id)
        if entry is None or entry.finished_at is not None:
            return
        content, start = entry.content, entry.next_row
        rows_total = sum(1 for _ in parse_dose_csv(io.BytesIO(content)))
        remaining = (row for row in parse_dose_csv(io.BytesIO(content)) if row[0] >= start)
        chunk = list(itertools.islice(remaining, self._chunk_rows))
        while True:
            following = list(itertools.islice(remaining, self._chunk_rows))
            async with UnitOfWork(self._databases) as uow:
                if self._after_commit is not None:
                    self._after_commit(uow)
                entry = await service.record_import_rows(
                    uow,
                    import_id=import_id,
                    rows=chunk,
                    rows_total=rows_total,
                    done=not following,
                    rules=default_rules(),
                    today=japan_today(),
                )
                if entry is not None and entry.finished_at is None:
                    entry.lease_until = utcnow() + self._lease
            if not following or entry is None or entry.finished_at is not None:
                return
            chunk = following

    async def run(self) -> None:
        while True:
            try:
                if await self.run_once():
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dose import failed; it is retried when its lease runs out")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._idle)
            self._wake.clear()
