"""Resident CSV imports: stored first, then run in the background, resumable after a crash.

An upload is sealed (it holds My Numbers), written to the main database (``resident_import_chunks``) and
committed before the caller gets its 202, keyed by (municipality, sha256 of the file): the same file again
answers with the same import id and changes nothing. A task of the registry process then streams the stored
file through the resident CSV parser and writes ~1,000 rows per transaction with multi-row statements
(:func:`service.import_rows`). Each batch commits its shard rows, then its directory entries, progress
(``last_row``) and row errors in the main database; after a crash the import starts again from the stored
file, re-reads the rows up to ``last_row`` only to remember their keys (a later repeat is still an error), and
writes from the next row on. A batch that was written to the shard but whose progress was lost is simply
written again: an upsert of the same values changes nothing. Several registry replicas may pick up the same
import; the import row is locked for each batch and a batch already counted is skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import multiprocessing
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO, Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.registry import bulk, service
from services.registry.bulk import ChunkJob, PreparedChunk
from services.registry.crypto import MyNumberVault
from services.registry.models import ResidentImport
from services.registry.repository import DirectoryRepository, ImportRepository, ResidentRepository
from services.registry.schemas import ImportRowError, ImportStatus
from shared.db import Databases, UnitOfWork, utcnow
from shared.domain.csv_stream import CsvFileError, Parsed, RowError
from shared.domain.japan_time import japan_today
from shared.domain.resident_csv import COLUMN_ORDER, RawRow, Repeats, ResidentRow, check_row, resident_values
from shared.errors import Conflict, NotFound

log = logging.getLogger(__name__)

RUNNING, DONE = "running", "done"
CHUNK_BYTES = 1 << 20
SPOOL_BYTES = 8 << 20
# An import that stored this many rows refreshes the planner's statistics of what it wrote when it ends.
ANALYZE_AFTER_ROWS = 10_000
# Fewer rows than a file's size over this: the sets of keys seen (Repeats) are sized for them at once rather
# than grown from small (growing re-placed every key each time, in Python: ~0.7 µs a resident at 1M).
ROW_BYTES_AT_MOST = 128


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


def _chunk_context(import_id: str, seq: int) -> str:
    # Bound to the sealed piece: a piece cannot be moved to another import or another place in the file.
    return f"import/{import_id}/{seq}"


async def submit(
    uow: UnitOfWork,
    *,
    vault: MyNumberVault,
    municipality_code: str,
    submitted_by: str,
    file: IO[bytes],
    sha256: str,
    size: int,
) -> tuple[str, bool]:
    """Store the upload, sealed (in the caller's unit of work); (import id, whether it is new). The same file
    sent again by the municipality returns the first import's id."""
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
        key_id, sealed = vault.seal_bytes(piece, context=_chunk_context(entry.import_id, seq))
        await imports.add_chunk(entry.import_id, seq, key_id, sealed)
        seq += 1
    return entry.import_id, True


async def reseal_chunks_batch(session: AsyncSession, vault: MyNumberVault, *, limit: int) -> int:
    """Re-seal up to ``limit`` stored upload pieces under the active key (``vrs keys rotate``); how many (0:
    none left). An upload lives until its import ends, but one that keeps failing lives on: an old key may
    only be removed once no piece names it either."""
    imports = ImportRepository(session)
    rows = await imports.chunks_under_other_keys(vault.active_key, limit)
    for import_id, seq, key_id, data in rows:
        context = _chunk_context(import_id, seq)
        plain = bytes(data) if key_id is None else vault.open_bytes(key_id, bytes(data), context=context)
        new_key, sealed = vault.seal_bytes(plain, context=context)
        await imports.reseal_chunk(import_id, seq, key_id=new_key, data=sealed)
    return len(rows)


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


@dataclass(slots=True)
class _Chunk:
    """A prepared chunk after the in-file repeats were checked (in file order, in this process)."""

    raw: list[Parsed[RawRow]]
    prepared: PreparedChunk
    good: list[int]  # indexes of good rows
    bad: list[tuple[int, list[RowError]]]
    last_row: int


class ResidentImporter:
    """Runs stored imports as tasks of this process; :meth:`resume` picks up what a crash left running.

    On PostgreSQL the rows are checked, sealed and turned into COPY lines by ``workers`` processes (the
    CPU of an import), chunk by chunk, while this process reads the file and writes the previous chunk.
    """

    def __init__(
        self,
        databases: Databases,
        vault: MyNumberVault,
        *,
        batch_size: int = 1000,
        workers: int = 2,
        workers_min_bytes: int = 1 << 20,
        work_dir: Path | None = None,
        on_commit: Callable[[list[str]], None] | None = None,
        retry_seconds: float = 2.0,
    ) -> None:
        self._databases = databases
        self._vault = vault
        self._batch_size = batch_size
        self._workers = workers
        self._workers_min_bytes = workers_min_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._work_dir = work_dir
        self._on_commit = on_commit
        self._retry = retry_seconds
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._collided: set[str] = set()  # imports that met a stored key: their chunks are checked first

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
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, cancel_futures=True)

    async def _run(self, import_id: str) -> None:
        while True:
            try:
                await self._run_once(import_id)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A database or shard briefly away: the file and the progress are stored, start again.
                log.exception("resident import %s failed; retrying in %.1fs", import_id, self._retry)
                if isinstance(exc, BrokenProcessPool):  # a worker died (killed, out of memory): new ones
                    self._pool = None
                await asyncio.sleep(self._retry)

    @property
    def _postgres(self) -> bool:
        """Whether new rows may be copied as prepared (PostgreSQL's COPY); elsewhere every row is upserted."""
        return bool(self._databases.main.engine.dialect.name == "postgresql")

    def _executor(self, size: int) -> ProcessPoolExecutor | None:
        """The worker processes, started at the first large import on PostgreSQL (None: check rows in this
        process: on SQLite, with no workers configured, or for a file smaller than ``workers_min_bytes``)."""
        if self._workers < 1 or not self._postgres or size < self._workers_min_bytes:
            return None
        if self._pool is None:
            # spawn, not fork: this process runs an event loop and driver threads a fork would copy mid-flight.
            self._pool = ProcessPoolExecutor(
                self._workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=bulk.init_worker,
                initargs=(self._vault.keys,),
            )
        return self._pool

    async def _run_once(self, import_id: str) -> None:
        async with UnitOfWork(self._databases) as uow:
            entry = await ImportRepository(uow.main()).get(import_id)
        if entry is None or entry.status != RUNNING:
            return
        with tempfile.TemporaryFile(dir=self._work_dir) as local:
            await self._copy_file(import_id, local)
            local.seek(0)
            pool = self._executor(entry.size_bytes)
            if pool is None:
                error = await self._run_in_process(entry, local)
            else:
                error = await self._run_in_workers(entry, local, pool)
        await self._finish(entry, file_error=error)

    async def _run_in_process(self, entry: ResidentImport, local: IO[bytes]) -> str | None:
        reader = _CountingReader(local)
        today = japan_today()
        raw: Iterator[Parsed[RawRow]] = resident_values(reader)
        repeats = Repeats(expected_rows=entry.size_bytes // ROW_BYTES_AT_MOST)

        def next_chunk() -> tuple[list[Parsed[RawRow]], int]:
            return list(itertools.islice(raw, self._batch_size)), reader.position

        # The next chunk is read (in a thread) while this one is written: reading overlaps the database.
        pending = asyncio.ensure_future(asyncio.to_thread(next_chunk))
        try:
            while True:
                try:
                    rows, position = await pending
                except CsvFileError as exc:
                    return str(exc)
                if not rows:
                    return None
                pending = asyncio.ensure_future(asyncio.to_thread(next_chunk))
                job = self._job(entry, rows, today)
                prepared = bulk.prepare(job, self._vault)
                await self._write(entry, self._sorted(rows, prepared, repeats), bytes_done=position)
        finally:
            # Never leave the reading thread on a file about to be closed.
            if not pending.done():
                await asyncio.wait([pending])
            if not pending.cancelled():
                pending.exception()  # retrieved: an error here was the write's, reported by it

    async def _run_in_workers(self, entry: ResidentImport, local: IO[bytes], pool: ProcessPoolExecutor) -> str | None:
        """Read chunks here, prepare them in the pool (up to ``workers + 1`` ahead), write them in file order."""
        reader = _CountingReader(local)
        today = japan_today()
        raw: Iterator[Parsed[RawRow]] = resident_values(reader)
        repeats = Repeats(expected_rows=entry.size_bytes // ROW_BYTES_AT_MOST)
        loop = asyncio.get_running_loop()
        ahead: asyncio.Queue[tuple[list[Parsed[RawRow]], int, asyncio.Future[PreparedChunk]] | None] = asyncio.Queue(
            self._workers + 1
        )

        def next_chunk() -> tuple[list[Parsed[RawRow]], int]:
            return list(itertools.islice(raw, self._batch_size)), reader.position

        async def read() -> None:
            while True:
                reading = asyncio.ensure_future(asyncio.to_thread(next_chunk))
                try:
                    rows, position = await asyncio.shield(reading)
                except asyncio.CancelledError:
                    await asyncio.wait([reading])  # never leave the thread on a file about to be closed
                    raise
                if not rows:
                    await ahead.put(None)
                    return
                job = self._job(entry, rows, today)
                await ahead.put((rows, position, loop.run_in_executor(pool, bulk.prepare_in_worker, job)))

        reading = asyncio.create_task(read())
        # The chunk being written: the next one's repeats are checked meanwhile (this process's CPU beside
        # PostgreSQL's); chunks are still written one after the other, in file order.
        writing: asyncio.Task[None] | None = None
        try:
            while True:
                getting = asyncio.ensure_future(ahead.get())
                await asyncio.wait([getting, reading], return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    try:
                        reading.result()
                    except CsvFileError as exc:
                        if writing is not None:
                            await writing
                        return str(exc)
                    continue  # the reader ended normally; its last item is in the queue
                item = getting.result()
                if item is None:
                    if writing is not None:
                        await writing
                    return None
                rows, position, prepared = item
                chunk = self._sorted(rows, await prepared, repeats)
                if writing is not None:
                    await writing
                locked = asyncio.Event()
                writing = asyncio.create_task(self._write(entry, chunk, bytes_done=position, locked=locked))
                # The next chunk's repeats are checked once this write holds its lock and is copying: checked
                # at once, they kept the write's first statement waiting 7-50 ms for this event loop.
                waiting = asyncio.ensure_future(locked.wait())
                try:
                    await asyncio.wait([waiting, writing], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiting.cancel()
        finally:
            if writing is not None and not writing.done():
                writing.cancel()
                await asyncio.wait([writing])
            if writing is not None and not writing.cancelled():
                writing.exception()  # retrieved: an error of a write was raised above, or is moot after one
            reading.cancel()
            await asyncio.wait([reading])
            if not reading.cancelled() and not isinstance(reading.exception(), CsvFileError | None):
                log.debug("resident import reader stopped: %r", reading.exception())
            while not ahead.empty():
                if (left := ahead.get_nowait()) is not None:
                    left[2].cancel()

    def _job(self, entry: ResidentImport, rows: list[Parsed[RawRow]], today: date) -> ChunkJob:
        return ChunkJob(
            municipality_code=entry.municipality_code,
            changed_by=f"import:{entry.import_id}",
            now=utcnow().isoformat(),
            today=today,
            rows=rows,
            # Committed before a crash: the repeats need their keys, nothing else. Without COPY the lines
            # would not be used either.
            keys_only=rows[-1][0] <= entry.last_row or not self._postgres,
        )

    @staticmethod
    def _sorted(rows: list[Parsed[RawRow]], prepared: PreparedChunk, repeats: Repeats) -> _Chunk:
        good, bad = [], []
        found = repeats.check_chunk(prepared.id_texts, prepared.id_keys, prepared.number_keys, prepared.coupon_keys)
        numbers = prepared.numbers
        for i, errors in enumerate(prepared.errors):
            if i in found:
                errors = sorted((errors or []) + found[i], key=lambda e: COLUMN_ORDER.get(e.field, 0))
            if errors is None:
                good.append(i)
            else:
                bad.append((numbers[i], errors))
        return _Chunk(rows, prepared, good, bad, last_row=prepared.numbers[-1])

    async def _copy_file(self, import_id: str, local: IO[bytes]) -> None:
        """The stored file onto local disk for the parser's thread (which cannot await the database)."""
        seq = 0
        while True:
            async with self._databases.main.sessionmaker() as session:
                stored = await ImportRepository(session).chunk(import_id, seq)
            if stored is None:
                return
            key_id, piece = stored
            if key_id is not None:  # None: stored before uploads were sealed
                piece = self._vault.open_bytes(key_id, piece, context=_chunk_context(import_id, seq))
            await asyncio.to_thread(local.write, piece)
            seq += 1

    async def _write(
        self, entry: ResidentImport, chunk: _Chunk, *, bytes_done: int, locked: asyncio.Event | None = None
    ) -> None:
        if chunk.last_row <= entry.last_row:
            return  # committed before the crash; the repeats only had to see its keys
        if entry.import_id not in self._collided:
            # Copied unchecked: every key the checks look for is a unique key of the tables copied into, so a
            # chunk that copies without a violation is one the checks would have passed whole. The checks
            # cost a third of PostgreSQL's time on a new municipality's file, where they never find anything.
            try:
                await self._write_once(entry, chunk, bytes_done=bytes_done, direct=True, checked=False, locked=locked)
                return
            except Conflict:
                # Some rows are known (a later extract of the same register): check every chunk from here on.
                self._collided.add(entry.import_id)
        try:
            await self._write_once(entry, chunk, bytes_done=bytes_done, direct=True, checked=True, locked=locked)
        except Conflict:
            # Another writer stored a key of a new row meanwhile: redo this chunk row by row's rules.
            await self._write_once(entry, chunk, bytes_done=bytes_done, direct=False, checked=True)

    async def _write_once(
        self,
        entry: ResidentImport,
        chunk: _Chunk,
        *,
        bytes_done: int,
        direct: bool,
        checked: bool,
        locked: asyncio.Event | None = None,
    ) -> None:
        today = japan_today()
        async with UnitOfWork(self._databases) as uow:
            imports = ImportRepository(uow.main())
            current = await imports.get(entry.import_id, for_update=True)
            if locked is not None:
                locked.set()
            if current is None or current.status != RUNNING or chunk.last_row <= current.last_row:
                return  # another replica got there first
            numbers = chunk.prepared.numbers
            good = [i for i in chunk.good if numbers[i] > current.last_row]
            bad = [(n, e) for n, e in chunk.bad if n > current.last_row]
            result = service.BatchResult(ok=0, errors=[], changed=0)
            if good:

                def row_of(i: int) -> ResidentRow:
                    row, _ = check_row(chunk.raw[i][1], today)  # type: ignore[arg-type]
                    assert isinstance(row, ResidentRow)
                    return row

                result = await service.import_prepared(
                    await uow.for_municipality(entry.municipality_code),
                    uow.main(),
                    self._vault,
                    municipality_code=entry.municipality_code,
                    chunk=chunk.prepared,
                    good=good,
                    row_of=row_of,
                    changed_by=f"import:{entry.import_id}",
                    today=today,
                    direct=direct and self._postgres,
                    checked=checked,
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
                    "last_row": chunk.last_row,
                    "bytes_done": bytes_done,
                },
                at=utcnow(),
            )
            if self._on_commit is not None and result.changed:
                on_commit, shards = self._on_commit, uow.touched_shards
                uow.after_commit(lambda: on_commit(shards))
        entry.last_row = chunk.last_row

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
