"""Resident CSV imports: stored first, then run in the background, resumable after a crash.

An upload is written to the main database (``resident_import_chunks``) and committed before the caller gets
its 202, keyed by (municipality, sha256 of the file): the same file again answers with the same import id and
changes nothing. A task of the registry process then streams the stored file through the resident CSV
parser and writes ~1,000 rows per transaction with multi-row statements (:func:`service.import_rows`). Each
batch commits its shard rows, then its directory entries, progress (``last_row``) and row errors in the main
database; after a crash the import starts again from the stored file, re-reads the rows up to ``last_row``
only to remember their keys (a later repeat is still an error), and writes from the next row on. A batch
that was written to the shard but whose progress was lost is simply written again: an upsert of the same
values changes nothing. Several registry replicas may pick up the same import; the import row is locked for
each batch and a batch already counted is skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any

from services.registry import service
from services.registry.crypto import MyNumberVault
from services.registry.models import ResidentImport
from services.registry.repository import DirectoryRepository, ImportRepository, ResidentRepository
from services.registry.schemas import ImportRowError, ImportStatus
from shared.db import Databases, UnitOfWork, utcnow
from shared.domain.csv_stream import Batch, CsvFileError, RowError, batches
from shared.domain.japan_time import japan_today
from shared.domain.resident_csv import ResidentRow, parse_resident_csv
from shared.errors import NotFound

log = logging.getLogger(__name__)

RUNNING, DONE = "running", "done"
CHUNK_BYTES = 1 << 20
SPOOL_BYTES = 8 << 20
# An import that stored this many rows refreshes the planner's statistics of what it wrote when it ends.
ANALYZE_AFTER_ROWS = 10_000


def import_not_found() -> NotFound:
    return NotFound("no such resident import")


async def spool(body: AsyncIterator[bytes]) -> tuple[IO[bytes], str, int]:
    """The request body in a temporary file (memory up to 8 MiB, then disk), its sha256 and size."""
    file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - the caller closes it
    digest, size = hashlib.sha256(), 0
    async for piece in body:
        digest.update(piece)
        file.write(piece)
        size += len(piece)
    file.seek(0)
    return file, digest.hexdigest(), size


async def submit(
    uow: UnitOfWork, *, municipality_code: str, submitted_by: str, file: IO[bytes], sha256: str, size: int
) -> tuple[str, bool]:
    """Store the upload (in the caller's unit of work); (import id, whether it is new). The same file sent
    again by the municipality returns the first import's id."""
    imports = ImportRepository(uow.main())
    known = await imports.by_file(municipality_code, sha256)
    if known is not None:
        return known.import_id, False
    now = utcnow()
    entry = ResidentImport(
        import_id=str(uuid.uuid4()),
        municipality_code=municipality_code,
        sha256=sha256,
        size_bytes=size,
        status=RUNNING,
        submitted_by=submitted_by,
        rows_total=0,
        rows_ok=0,
        rows_failed=0,
        last_row=1,
        bytes_done=0,
        created_at=now,
        updated_at=now,
    )
    imports.add(entry)
    await imports.session.flush()
    seq = 0
    while piece := await asyncio.to_thread(file.read, CHUNK_BYTES):
        await imports.add_chunk(entry.import_id, seq, piece)
        seq += 1
    return entry.import_id, True


async def status(
    uow: UnitOfWork, *, municipality_code: str, import_id: str, errors_after_row: int, errors_limit: int
) -> ImportStatus:
    imports = ImportRepository(uow.main())
    entry = await imports.get(import_id)
    if entry is None or entry.municipality_code != municipality_code:
        raise import_not_found()
    errors = await imports.errors(import_id, after_row=errors_after_row, limit=errors_limit + 1)
    return ImportStatus(
        import_id=entry.import_id,
        status=entry.status,
        rows_total=entry.rows_total,
        rows_ok=entry.rows_ok,
        rows_failed=entry.rows_failed,
        errors=[ImportRowError(row=e.row, field=e.field, message=e.message) for e in errors[:errors_limit]],
        errors_more=len(errors) > errors_limit,
        bytes_total=entry.size_bytes,
        bytes_done=entry.bytes_done,
        created_at=entry.created_at,
        finished_at=entry.finished_at,
    )


class _CountingReader:
    """A binary file that counts what the parser has read (the progress shown while an import runs)."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.position = 0

    def read(self, size: int, /) -> bytes:
        data = self._file.read(size)
        self.position += len(data)
        return data


class ResidentImporter:
    """Runs stored imports as tasks of this process; :meth:`resume` picks up what a crash left running."""

    def __init__(
        self,
        databases: Databases,
        vault: MyNumberVault,
        *,
        batch_size: int = 1000,
        work_dir: Path | None = None,
        on_commit: Callable[[list[str]], None] | None = None,
        retry_seconds: float = 2.0,
    ) -> None:
        self._databases = databases
        self._vault = vault
        self._batch_size = batch_size
        self._work_dir = work_dir
        self._on_commit = on_commit
        self._retry = retry_seconds
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, import_id: str) -> None:
        task = self._tasks.get(import_id)
        if task is None or task.done():
            self._tasks[import_id] = asyncio.create_task(self._run(import_id), name=f"resident-import-{import_id}")

    async def resume(self) -> None:
        async with UnitOfWork(self._databases) as uow:
            unfinished = await ImportRepository(uow.main()).unfinished()
        for import_id in unfinished:
            log.info("resuming resident import %s", import_id)
            self.start(import_id)

    async def wait(self, import_id: str) -> None:
        """Until the import's task ends (tests, the benchmark)."""
        task = self._tasks.get(import_id)
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        """Stop the running imports where they are: they resume from their last batch at the next start."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._tasks.clear()

    async def _run(self, import_id: str) -> None:
        while True:
            try:
                await self._run_once(import_id)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                # A database or shard briefly away: the file and the progress are stored, start again.
                log.exception("resident import %s failed; retrying in %.1fs", import_id, self._retry)
                await asyncio.sleep(self._retry)

    async def _run_once(self, import_id: str) -> None:
        async with UnitOfWork(self._databases) as uow:
            entry = await ImportRepository(uow.main()).get(import_id)
        if entry is None or entry.status != RUNNING:
            return
        with tempfile.TemporaryFile(dir=self._work_dir) as local:
            await self._copy_file(import_id, local)
            local.seek(0)
            reader = _CountingReader(local)
            parsed = parse_resident_csv(reader, today=japan_today())
            groups = batches(parsed, self._batch_size)
            # The next batch is parsed (in a thread) while this one is written: parsing overlaps the database.
            pending = asyncio.ensure_future(asyncio.to_thread(next, groups, None))
            try:
                while True:
                    try:
                        batch = await pending
                    except CsvFileError as exc:
                        await self._finish(entry, file_error=str(exc))
                        return
                    if batch is None:
                        break
                    bytes_done = reader.position
                    pending = asyncio.ensure_future(asyncio.to_thread(next, groups, None))
                    await self._write(entry, batch, bytes_done=bytes_done)
            finally:
                # Never leave the parser thread reading a file about to be closed.
                if not pending.done():
                    await asyncio.wait([pending])
                if not pending.cancelled():
                    pending.exception()  # retrieved: an error here was the write's, reported by it
        await self._finish(entry, file_error=None)

    async def _copy_file(self, import_id: str, local: IO[bytes]) -> None:
        """The stored file onto local disk for the parser's thread (which cannot await the database)."""
        seq = 0
        while True:
            async with self._databases.main.sessionmaker() as session:
                piece = await ImportRepository(session).chunk(import_id, seq)
            if piece is None:
                return
            await asyncio.to_thread(local.write, piece)
            seq += 1

    async def _write(self, entry: ResidentImport, batch: Batch[ResidentRow], *, bytes_done: int) -> None:
        if batch.last_row <= entry.last_row:
            return  # committed before the crash; the parser only had to see its keys
        async with UnitOfWork(self._databases) as uow:
            imports = ImportRepository(uow.main())
            current = await imports.get(entry.import_id, for_update=True)
            if current is None or current.status != RUNNING or batch.last_row <= current.last_row:
                return  # another replica got there first
            rows = [(n, r) for n, r in batch.rows if n > current.last_row]
            bad = [(n, e) for n, e in batch.errors if n > current.last_row]
            result = service.BatchResult(ok=0, errors=[], changed=0)
            if rows:
                result = await service.import_rows(
                    await uow.for_municipality(entry.municipality_code),
                    uow.main(),
                    self._vault,
                    municipality_code=entry.municipality_code,
                    rows=rows,
                    changed_by=f"import:{entry.import_id}",
                    today=japan_today(),
                )
            failed = sorted(bad + result.errors, key=lambda item: item[0])
            await imports.add_errors(entry.import_id, list(_numbered(failed)))
            ok_total, failed_total = current.rows_ok + result.ok, current.rows_failed + len(failed)
            await imports.advance(
                entry.import_id,
                values={
                    "rows_ok": ok_total,
                    "rows_failed": failed_total,
                    "rows_total": ok_total + failed_total,
                    "last_row": batch.last_row,
                    "bytes_done": bytes_done,
                },
                at=utcnow(),
            )
            if self._on_commit is not None and result.changed:
                on_commit, shards = self._on_commit, uow.touched_shards
                uow.after_commit(lambda: on_commit(shards))
        entry.last_row = batch.last_row

    async def _finish(self, entry: ResidentImport, *, file_error: str | None) -> None:
        async with UnitOfWork(self._databases) as uow:
            imports = ImportRepository(uow.main())
            current = await imports.get(entry.import_id, for_update=True)
            if current is None or current.status != RUNNING:
                return
            values: dict[str, Any] = {"status": DONE, "finished_at": utcnow(), "bytes_done": current.size_bytes}
            if file_error is not None:
                # Nothing was imported: the whole file is refused, as row 1 (the header) says why.
                await imports.add_errors(entry.import_id, [(1, 0, "file", file_error)])
            await imports.advance(entry.import_id, values=values, at=utcnow())
            # The file is no longer needed; its sha256 stays, so sending it again still changes nothing.
            await imports.drop_chunks(entry.import_id)
            if current.rows_ok >= ANALYZE_AFTER_ROWS:
                await ResidentRepository(await uow.for_municipality(entry.municipality_code)).refresh_statistics()
                await DirectoryRepository(uow.main()).refresh_statistics()


def _numbered(failed: list[tuple[int, list[RowError]]]) -> Iterator[tuple[int, int, str, str]]:
    for row, errors in failed:
        for seq, error in enumerate(errors):
            yield row, seq, error.field, error.message
