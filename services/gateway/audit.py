"""The audit trail: every read or write of personal data, in keyed chains nobody can quietly rewrite.

**One chain per gateway instance** (``VRS_GATEWAY_INSTANCE_ID``): replicas never race for a chain head, so
none ever fails a request over it. Entries are numbered from 1 within their chain.

**Keyed**: ``mac = HMAC-SHA256(audit key, prev_mac || canonical JSON of the entry)`` (hex; the first
entry's ``prev_mac`` is 64 zeros). The key is a gateway secret (``VRS_GATEWAY_AUDIT_KEY``) that whoever
administers the database does not hold: they can delete rows, but cannot change or forge one and re-key the
rest. Changing, removing or reordering an entry breaks the chain there.

**Anchored**: after each batch the chain's head (last seq and its MAC) is written outside the table by an
:class:`AnchorStore`. Cutting entries off the end leaves a valid shorter chain in the table, but it no longer
reaches the anchored head; removing a whole chain leaves an anchor without rows. The default store is a
file per instance (``VRS_GATEWAY_AUDIT_ANCHOR_DIR``); production mounts that directory from storage the
database administrator cannot write (see README, "Audit trail").

**Intent, then outcome** for a request that may change something (any method but GET and HEAD): it is
recorded *before* it is forwarded — an intent entry (``outcome`` null), committed, or the request is refused
(503) and never reaches the service — and its outcome (the status the caller got, ``intent_seq`` naming the
intent) is appended after. The caller does not wait for the outcome entry: once the service has acted, its
answer is delivered whatever happens to the audit database; the writer keeps the outcome entry and retries
until it is stored. So no request is executed without an entry, and none is reported failed after it
succeeded. An intent without an outcome means the outcome is unknown (the gateway stopped, or the intent's
commit was reported failed and the request refused).

**One entry for a read** (GET, HEAD): a read discloses nothing until its answer leaves the gateway, so it is
forwarded at once and recorded by one entry with the status the caller gets, committed *before* the answer
goes out; if the trail cannot take it, the answer is withheld (503). Half the entries of intent and outcome,
and the commit no longer comes before the service's work as well as after the gateway's.

An awaited entry (an intent, a read) that the trail stores only after its caller gave up waiting is followed
by an entry naming it by ``intent_seq`` with the status the caller got instead (503), so that neither an intent
nor a read's 200 stands uncorrected.

**Batched** (group commit): requests hand their entry to one writer task per process. The writer takes
everything queued while the previous batch was being written and stores it with one multi-row INSERT and
one commit, computing the chain's MACs in the batch — batches grow with the load (hundreds of entries per
commit at thousands of requests per second, one at idle, no timer to wait for).

**Kept for years, then cut from the front** (``services/gateway/housekeeping.py``): entries older than
``VRS_GATEWAY_AUDIT_KEEP_YEARS`` are deleted from the start of their chain, and ``audit_cuts`` records per chain
the last entry deleted and its MAC, keyed in turn (:func:`cut_mac`). A chain then verifies from its cut: deleting
more, or moving the cut, still shows; only whoever holds the key can cut.

``vrs audit verify`` (:func:`verify_trail`) checks every chain against its anchor.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Histogram
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from services.gateway.repository import AuditRepository, insert_json_autocommit
from shared import redaction
from shared.db import Databases, utcnow
from shared.errors import InvalidField

log = logging.getLogger(__name__)

AUDIT_ENTRIES = Counter("vrs_gateway_audit_entries", "Audit entries stored")
AUDIT_BATCH_SECONDS = Histogram(
    "vrs_gateway_audit_batch_seconds",
    "Time to store one batch of audit entries (INSERT or COPY and commit)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
)
AUDIT_FAILED_BATCHES = Counter("vrs_gateway_audit_failed_batches", "Audit batches not stored (retried or refused)")
AUDIT_WAIT_SECONDS = Histogram(
    "vrs_gateway_audit_wait_seconds",
    "Time a request waited for its audit entry to be stored: an intent before the request is forwarded "
    "(entry=intent), a read's entry before its answer leaves (entry=read)",
    ["entry"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
)
# Resolved once: a label lookup per audited request costs more than the observation.
_WAITED = {True: AUDIT_WAIT_SECONDS.labels("intent"), False: AUDIT_WAIT_SECONDS.labels("read")}

GENESIS_MAC = "0" * 64
# Fields of an entry that its MAC covers (the canonical form sorts them).
_KEYED = (
    "instance",
    "seq",
    "recorded_at",
    "request_id",
    "principal",
    "role",
    "caller_municipality",
    "institution",
    "municipality",
    "action",
    "resource",
    "legal_basis",
    "outcome",
)


class LegalBasis(StrEnum):
    """Why personal data was accessed: a fixed list, never free text."""

    # The municipality's own vaccination administration (予防接種法に基づく事務).
    ADMINISTRATION = "administration"
    # The person agreed (本人同意).
    CONSENT = "consent"
    # My Number Act art. 19 item 16 (番号法第19条第16号): transfer look-ups between municipalities.
    MY_NUMBER_ACT_19_16 = "my-number-act-19-16"


DEFAULT_LEGAL_BASIS = LegalBasis.ADMINISTRATION


def legal_basis(stated: object) -> LegalBasis | None:
    """The basis a caller stated, or None when it is not one of :class:`LegalBasis`."""
    try:
        return LegalBasis(stated) if isinstance(stated, str) else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class AuditFacts:
    """What the request handler knows about one access; the writer adds the order and the MACs."""

    request_id: str
    principal: str
    role: str
    caller_municipality: str | None
    institution: str | None
    municipality: str | None
    action: str
    resource: str
    # One of :class:`LegalBasis`, or several sorted and comma-separated (a batch of transfer lookups).
    legal_basis: str
    # The status the caller got; None in an intent entry (written before the request is forwarded).
    outcome: int | None
    # In an outcome entry: the seq of the entry it completes (an intent) or corrects (a read stored too late).
    intent_seq: int | None = None
    # The entry as the writer stores it, but for its place in the chain and its outcome: built by the first
    # writer that stores it, and shared by the outcome entry of the same request (:meth:`with_outcome`).
    _prepared: _Prepared | None = field(default=None, init=False, repr=False, compare=False)

    def with_outcome(self, outcome: int, intent_seq: int) -> AuditFacts:
        """The outcome entry of this intent; cheaper than ``dataclasses.replace``, which inspects the fields."""
        entry = AuditFacts(
            self.request_id,
            self.principal,
            self.role,
            self.caller_municipality,
            self.institution,
            self.municipality,
            self.action,
            self.resource,
            self.legal_basis,
            outcome,
            intent_seq,
        )
        # The same request: the same fields as stored, and the same pieces of canonical JSON.
        object.__setattr__(entry, "_prepared", self._prepared)
        return entry


@dataclass(frozen=True, slots=True)
class _Prepared:
    """An entry's fields as stored (masked, codes checked) and its canonical JSON around the fields that vary.

    :func:`canonical` sorts the keys: ``action``, ``caller_municipality``, ``instance``, ``institution``,
    ``intent_seq`` (outcome entries only), ``legal_basis``, ``municipality``, ``outcome``, ``principal``,
    ``recorded_at``, ``request_id``, ``resource``, ``role``, ``seq``. ``head`` runs up to the instance's value,
    ``institution`` to before ``intent_seq``, ``basis`` to the outcome's value, ``principal`` to the time's and
    ``tail`` to the seq's; the writer puts chain, intent, outcome, time and seq in between. One string join per
    entry instead of a dict and a sorting JSON encoder: the writer's largest cost per entry (py-spy)."""

    request_id: str
    principal: str
    caller_municipality: str | None
    institution: str | None
    municipality: str | None
    resource: str
    head: str
    institution_json: str
    basis: str
    principal_json: str
    tail: str


# How JSONEncoder(ensure_ascii=False) writes a string (the C encoder): the canonical form's strings.
_json_text: Callable[[str], str] = json.encoder.encode_basestring


def _json_or_null(value: str | None) -> str:
    return "null" if value is None else _json_text(value)


def redact_my_numbers(text: str) -> str:
    """Mask every run of twelve digits that passes the My Number check digit (``********9018``); other
    twelve-digit ids stay exact, so the audit trail still names what was read."""
    return redaction.redact_my_numbers(text, only_valid=True)


def _code(value: str | None, digits: int) -> str | None:
    """A municipality (6) or institution (10) code as stored, or None for anything that is not one.

    The municipality of an entry comes from the request's path: a refused ``/…/municipalities/1234567/…`` must
    not reach the database, whose column would refuse it and with it the whole batch — and a refusal is retried
    until stored, so every batch after it (the path itself stays in ``resource``)."""
    if value is None or (len(value) == digits and value.isascii() and value.isdigit()):
        return value
    return None


def utc_text(value: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC: the spelling the MAC covers."""
    # SQLite hands timestamps back without a zone, PostgreSQL in the session's zone: key one spelling.
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    # isoformat without a zone is strftime's "%Y-%m-%dT%H:%M:%S.%f" at a fraction of its cost.
    return aware.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_SORTED_KEYED = tuple(sorted(_KEYED))
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical(fields: Mapping[Any, Any], *, recorded_at: str | None = None) -> bytes:
    """The bytes an entry's MAC covers: its fields as JSON with sorted keys and no spaces.

    ``recorded_at``: the time already formatted (one batch shares one time; formatting it once per batch
    is a good part of the writer's cost).
    """
    doc = {name: fields[name] for name in _SORTED_KEYED}
    doc["recorded_at"] = recorded_at or utc_text(doc["recorded_at"])
    # Keyed only where present, so entries written before outcome entries existed keep their MACs; adding or
    # removing it changes the bytes either way.
    if (intent_seq := fields.get("intent_seq")) is not None:
        doc["intent_seq"] = intent_seq
    return _ENCODE(doc).encode()


def entry_mac(key: bytes, prev_mac: str, fields: Mapping[Any, Any], *, recorded_at: str | None = None) -> str:
    message = prev_mac.encode("ascii") + canonical(fields, recorded_at=recorded_at)
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def cut_mac(key: bytes, cut: Mapping[Any, Any]) -> str:
    """The MAC of a cut (a row of ``audit_cuts``): its fields as canonical JSON, keyed like the entries, behind a
    prefix that no entry's message (which starts with 64 hex digits) has."""
    doc = {
        "instance": cut["instance"],
        "seq": cut["seq"],
        "mac": cut["mac"],
        "kept_since": utc_text(cut["kept_since"]),
        "cut_at": utc_text(cut["cut_at"]),
    }
    return hmac.new(key, b"cut:" + _ENCODE(doc).encode(), hashlib.sha256).hexdigest()


def cut_is_genuine(key: bytes, cut: Mapping[Any, Any]) -> bool:
    return hmac.compare_digest(str(cut["cut_mac"]), cut_mac(key, cut))


def anchor_holds(anchor: Anchor, cut: Mapping[Any, Any] | None, entry: Mapping[Any, Any] | None) -> bool:
    """Whether the chain still reaches ``anchor``: the anchored ``entry`` is there with its MAC, or retention cut the
    chain at or past it (``cut``). An anchor behind the cut is one a power cut left behind (see
    :class:`FileAnchorStore`); the chain is checked from the cut on."""
    if cut is not None and anchor.seq <= cut["seq"]:
        return bool(anchor.seq < cut["seq"] or anchor.mac == cut["mac"])
    return entry is not None and entry["mac"] == anchor.mac


def _prepare(f: AuditFacts, redact: Callable[[str], str]) -> _Prepared:
    """``f`` as stored (see :class:`_Prepared`), remembered on ``f``."""
    # Whatever the caller chose (ids, request id, token subject) is masked.
    request_id, principal, resource = (
        redact(f.request_id),
        redact(f.principal),
        redact(f.resource),
    )
    caller, institution = _code(f.caller_municipality, 6), _code(f.institution, 10)
    municipality = _code(f.municipality, 6)
    prepared = _Prepared(
        request_id=request_id,
        principal=principal,
        caller_municipality=caller,
        institution=institution,
        municipality=municipality,
        resource=resource,
        head=f'{{"action":{_json_text(f.action)},"caller_municipality":{_json_or_null(caller)},"instance":',
        institution_json=',"institution":' + _json_or_null(institution),
        basis=f',"legal_basis":{_json_text(f.legal_basis)},"municipality":{_json_or_null(municipality)},"outcome":',
        principal_json=f',"principal":{_json_text(principal)},"recorded_at":',
        tail=f',"request_id":{_json_text(request_id)},"resource":{_json_text(resource)},"role":{_json_text(f.role)}'
        ',"seq":',
    )
    object.__setattr__(f, "_prepared", prepared)
    return prepared


def _document(
    d: _Prepared, instance_json: str, intent_seq: int | None, outcome: int | None, stamp_json: str, seq: int
) -> bytes:
    """:func:`canonical` of an entry without its closing brace, from its prepared pieces (the PostgreSQL writer's
    way: the row it stores is this document and the two MACs)."""
    return (
        d.head
        + instance_json
        + d.institution_json
        + ("" if intent_seq is None else ',"intent_seq":' + str(intent_seq))
        + d.basis
        + ("null" if outcome is None else str(outcome))
        + d.principal_json
        + stamp_json
        + d.tail
        + str(seq)
    ).encode()


# --- anchors -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Anchor:
    seq: int
    mac: str


class AnchorStore(Protocol):
    async def write(self, instance: str, anchor: Anchor) -> None: ...
    async def read(self, instance: str) -> Anchor | None: ...
    async def all(self) -> dict[str, Anchor]: ...
    def close(self) -> None: ...


class FileAnchorStore:
    """One small JSON file per instance, overwritten in place after every batch.

    The record is padded to a fixed :data:`_RECORD` bytes and written with one ``pwrite`` at offset 0 of a file
    kept open: a write that small lands within one disk sector, so it is replaced whole. The earlier
    write-a-temporary-then-rename cost 2-5 ms of wall time and ~200 µs of CPU per batch on ext4 (a rename over a
    file makes ext4 flush the new one: ``auto_da_alloc``), in the event loop — the largest single cost of an
    audited request under load; the ``pwrite`` costs ~5 µs.

    Not fsynced: a power cut may leave the anchor a batch or two behind the table, which verification accepts
    (entries past the anchor are checked by their MACs); it can never leave it ahead.
    """

    _RECORD = 256

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, int] = {}

    def _path(self, instance: str) -> Path:
        return self.directory / f"{instance}.json"

    def _fd(self, instance: str) -> int:
        fd = self._files.get(instance)
        if fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = self._files[instance] = os.open(self._path(instance), os.O_WRONLY | os.O_CREAT, 0o644)
        return fd

    def _write(self, instance: str, anchor: Anchor) -> None:
        # The same JSON as json.dumps would write; instance names and MACs need no escaping (settings pattern, hex).
        doc = b'{"instance": "%s", "seq": %d, "mac": "%s"}' % (instance.encode(), anchor.seq, anchor.mac.encode())
        if len(doc) >= self._RECORD:
            raise ValueError("anchor record too long")
        os.pwrite(self._fd(instance), doc.ljust(self._RECORD - 1) + b"\n", 0)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    async def write(self, instance: str, anchor: Anchor) -> None:
        self._write(instance, anchor)

    def _read(self, path: Path) -> Anchor:
        doc = json.loads(path.read_text())
        return Anchor(seq=int(doc["seq"]), mac=str(doc["mac"]))

    async def read(self, instance: str) -> Anchor | None:
        path = self._path(instance)
        return await asyncio.to_thread(self._read, path) if path.exists() else None

    async def all(self) -> dict[str, Anchor]:
        if not self.directory.exists():
            return {}
        return {p.stem: await asyncio.to_thread(self._read, p) for p in sorted(self.directory.glob("*.json"))}


# --- the writer ----------------------------------------------------------------------------------------


class AuditChainBroken(RuntimeError):
    """The table does not reach the anchored head: refuse to append (and so to overwrite the evidence)."""


class AuditUnavailable(RuntimeError):
    """The entry could not be stored (in time): the request it records must not go ahead."""


@dataclass(eq=False, slots=True)
class _Pending:
    facts: AuditFacts
    # None: nobody waits (an outcome entry, a refusal); the writer keeps it until it is stored.
    done: asyncio.Future[int] | None
    seq: int = 0
    stored_by: AuditTrail | None = None  # the chain that stored it (its seq counts in that chain)
    # An intent whose caller stopped waiting (the trail's timeout) and was refused: if it is stored after all,
    # the writer follows it with an outcome entry of this status, so that it does not read as forwarded.
    late_outcome: int | None = None


class _Work:
    """Entries any chain of the process may store (intents, refusals), and the writers waiting for work.

    Shared by the chains of :class:`AuditChains`: whichever writer is free takes everything queued, so a
    request never waits behind a commit in progress while another chain is idle, and under load the commits
    of several chains overlap (PostgreSQL flushes them together) — a pipeline without ever ordering one
    chain's batches across connections.
    """

    def __init__(self) -> None:
        self.queue: collections.deque[_Pending] = collections.deque()
        self.waiting: collections.deque[AuditTrail] = collections.deque()  # idle writers, longest idle first

    def put(self, pending: _Pending) -> None:
        self.queue.append(pending)
        if self.waiting:
            self.waiting.popleft()._wake()


async def _stored(pending: _Pending, put: Callable[[_Pending], None], timeout: float, late_outcome: int) -> int:
    """Hand ``pending`` over with ``put`` and wait for its seq, at most ``timeout`` seconds (the wait of one
    that was stored goes to :data:`AUDIT_WAIT_SECONDS`)."""
    done = pending.done
    assert done is not None
    # The future's loop: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
    loop = done.get_loop()
    put(pending)

    def expire() -> None:
        if done.done():
            return
        pending.late_outcome = late_outcome
        done.set_exception(AuditUnavailable(f"the audit entry was not stored within {timeout} s"))

    # One timer handle, not asyncio.timeout + shield + callbacks: this runs for every audited request.
    started = loop.time()
    timer = loop.call_later(timeout, expire)
    try:
        seq = await done
    finally:
        timer.cancel()
    _WAITED[pending.facts.outcome is None].observe(loop.time() - started)
    return seq


def _drain(queue: collections.deque[_Pending]) -> int:
    """Fail the waiters of what is left in ``queue``; the number of entries nobody waited for (lost)."""
    lost = 0
    while queue:
        pending = queue.popleft()
        if pending.done is None:
            lost += 1
        elif not pending.done.done():
            pending.done.set_exception(AuditUnavailable("the audit writer stopped"))
    return lost


class AuditTrail:
    """Appends this instance's entries in batches.

    :meth:`append` returns once its entry is committed (the seq it got), :meth:`record` hands an entry over
    without waiting: the writer retries it until it is stored.
    """

    _RETRY_PAUSE_MAX = 2.0
    _REDACTED_MAX = 4096

    def __init__(
        self,
        databases: Databases,
        *,
        key: bytes,
        instance: str,
        anchors: AnchorStore,
        batch_max: int = 1000,
        timeout: float = 5.0,
        linger: float = 0.0,
    ) -> None:
        self._databases = databases
        # How long a batch that nobody waits for (outcomes only) waits for company: the next request's intent
        # takes it along, so a lone request costs one commit rather than two, and the chain is free sooner.
        self._linger = linger
        self._key = key
        self.instance = instance
        self._anchors = anchors
        self._batch_max = batch_max
        self.timeout = timeout
        # Entries for this chain only (outcomes of its intents); ``_work``: entries for any chain of the process.
        self._own: collections.deque[_Pending] = collections.deque()
        self._work = _Work()
        self._shares_work = False
        self._wakeup: asyncio.Future[None] | None = None
        # Unawaited entries of a batch that failed: first in the next batch.
        self._retry: list[_Pending] = []
        # The head a failed batch would have left: if the table shows it after all, that batch was stored.
        self._unsure_head: tuple[int, str] | None = None
        self._head: tuple[int, str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._task_loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()  # set while the writer waits for work with nothing left to retry
        self._postgres = databases.main.engine.dialect.name == "postgresql"
        self._connection: AsyncConnection | None = None
        self._driver: Any = None  # the asyncpg connection under ``_connection``
        self._redacted: dict[str, str] = {}
        self.batches = 0  # for the bench and tests: how many commits carried the entries

    def _share(self, work: _Work) -> None:
        self._work, self._shares_work = work, True

    async def start(self) -> None:
        """Check the table still reaches the anchored head, then start the writer."""
        await self._load_head(check_anchor=True)
        self._task_loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._write_forever(), name=f"audit-writer-{self.instance}")

    async def stop(self, *, drain_seconds: float = 5.0) -> None:
        """Store what is still queued (for at most ``drain_seconds``), then stop the writer."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await self.flush(timeout=drain_seconds)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
        self._anchors.close()
        lost = len(self._retry) + _drain(self._own) + (0 if self._shares_work else _drain(self._work.queue))
        if lost:
            log.error("audit writer stopped with %d outcome entries not stored", lost)
        self._retry.clear()

    async def flush(self, *, timeout: float | None = None) -> None:
        """Wait until every entry handed over so far is stored (tests, shutdown)."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    async def _load_head(self, *, check_anchor: bool) -> tuple[int, str]:
        async with self._databases.main.sessionmaker() as session:
            repo = AuditRepository(session)
            head, cut = await repo.head(self.instance), await repo.cut(self.instance)
            anchor = await self._anchors.read(self.instance) if check_anchor else None
            if anchor is not None and not anchor_holds(anchor, cut, await repo.entry(self.instance, anchor.seq)):
                raise AuditChainBroken(
                    f"audit chain {self.instance} no longer reaches its anchored head (seq {anchor.seq}): "
                    "run `vrs audit verify`"
                )
        if head is None and cut is not None:
            # Retention cut every entry (none in its years): the chain goes on from the last one cut.
            if not cut_is_genuine(self._key, cut):
                raise AuditChainBroken(f"audit chain {self.instance}: its cut was changed: run `vrs audit verify`")
            head = (int(cut["seq"]), str(cut["mac"]))
        self._head = head or (0, GENESIS_MAC)
        return self._head

    def _redact(self, text: str) -> str:
        """:func:`redact_my_numbers`, and NUL characters replaced (U+FFFD): PostgreSQL's text cannot hold them, and
        one entry the database refuses fails its whole batch — a refusal, retried until stored, would fail every
        batch after it (``/…/residents/a%00b`` reaches the trail decoded). Remembered: a request's intent and
        outcome, and a resident read again and again, carry the same strings, and the regular expression was a
        tenth of the writer's CPU (py-spy)."""
        done = self._redacted.get(text)
        if done is None:
            if len(self._redacted) >= self._REDACTED_MAX:
                self._redacted.clear()
            done = self._redacted[text] = redact_my_numbers(text).replace("\x00", "\ufffd")
        return done

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The writer's loop, which every caller shares: asyncio.get_running_loop() costs a getpid() system call
        on Python 3.11, and this runs several times for every audited request."""
        loop = self._task_loop
        return loop if loop is not None else asyncio.get_running_loop()

    def _running(self) -> None:
        if not self.running():
            raise AuditUnavailable("the audit writer is not running")

    def _wake(self) -> None:
        self._idle.clear()
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _put_own(self, pending: _Pending) -> None:
        self._own.append(pending)
        self._wake()

    async def append(self, facts: AuditFacts, *, late_outcome: int = 503) -> int:
        """Store ``facts`` in this chain and return its seq; :class:`AuditUnavailable` if that fails or takes
        longer than the trail's timeout. An entry stored after its caller gave up waiting is followed by one with
        ``late_outcome`` (the caller refuses the request), so that an intent does not read as forwarded, nor a read
        as answered."""
        self._running()
        pending = _Pending(facts, self._loop().create_future())
        return await _stored(pending, self._put_own, self.timeout, late_outcome)

    def record(self, facts: AuditFacts) -> None:
        """Hand ``facts`` to this chain's writer without waiting; it is retried until stored (or the gateway
        stops)."""
        self._running()
        self._put_own(_Pending(facts, None))

    def _take(self, batch: list[_Pending]) -> None:
        own, shared, room = self._own, self._work.queue, self._batch_max - len(batch)
        while own and room > 0:
            batch.append(own.popleft())
            room -= 1
        while shared and room > 0:
            batch.append(shared.popleft())
            room -= 1

    async def _wait_for_work(self, *, holding: bool = False) -> None:
        """Wait until entries are handed over; ``holding``: the writer holds some already, and waits at most
        the linger (it is not idle meanwhile)."""
        if not holding:
            self._idle.set()
        loop = self._loop()
        wakeup = self._wakeup = loop.create_future()
        timer = loop.call_later(self._linger, self._wake) if holding else None
        if holding:
            self._work.waiting.appendleft(self)  # the next intent joins the entries held here: one commit
        else:
            self._work.waiting.append(self)
        try:
            await wakeup
        finally:
            if timer is not None:
                timer.cancel()
            self._wakeup = None
            with contextlib.suppress(ValueError):
                self._work.waiting.remove(self)

    async def _write_forever(self) -> None:
        pause = 0.0
        while True:
            retrying = bool(self._retry)
            batch, self._retry = self._retry, []
            self._take(batch)
            if not batch:
                await self._wait_for_work()
                continue
            self._idle.clear()
            if self._linger and not retrying and len(batch) < self._batch_max and all(p.done is None for p in batch):
                await self._wait_for_work(holding=True)
                self._take(batch)
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                self._retry = [p for p in batch if p.done is None]
                for p in batch:
                    if p.done is not None and not p.done.done():
                        p.done.set_exception(AuditUnavailable("the audit writer stopped"))
                raise
            except Exception as exc:
                log.error("audit batch of %d not written: %s", len(batch), type(exc).__name__)
                AUDIT_FAILED_BATCHES.inc()
                self._head = None  # unknown whether it was stored: read the head again
                for p in batch:
                    if p.done is not None and not p.done.done():
                        p.done.set_exception(AuditUnavailable(type(exc).__name__))
                self._retry = [p for p in batch if p.done is None]
                if self._retry and not self._own and not self._work.queue:
                    # Nobody waits: do not hammer a database that is down.
                    pause = min(self._RETRY_PAUSE_MAX, max(0.05, pause * 2))
                    await asyncio.sleep(pause)
            else:
                pause = 0.0
                for p in batch:
                    if p.done is None:
                        continue
                    p.stored_by = self
                    if not p.done.done():
                        p.done.set_result(p.seq)
                    elif p.late_outcome is not None:
                        # Stored after its caller was refused (503): say so, in the same chain.
                        late = p.facts.with_outcome(p.late_outcome, p.seq)
                        self._own.append(_Pending(late, None))

    async def _store_autocommit(self, rows: str) -> None:
        """PostgreSQL: one statement on a connection the writer keeps (a broken one is dropped, the next batch
        takes another from the pool)."""
        if self._connection is None:
            self._connection = await self._databases.main.engine.connect()
            # Looked up once per connection: SQLAlchemy's accessor costs a greenlet switch per batch.
            self._driver = (await self._connection.get_raw_connection()).driver_connection
        try:
            await insert_json_autocommit(self._driver, rows)
        except BaseException:
            await self._drop_connection()
            raise

    async def _drop_connection(self) -> None:
        connection, self._connection, self._driver = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.invalidate()
            with contextlib.suppress(Exception):
                await connection.close()

    async def _current_head(self, batch: list[_Pending]) -> tuple[int, str]:
        if self._head is not None:
            return self._head
        head = await self._load_head(check_anchor=False)
        if self._unsure_head is not None and head == self._unsure_head:
            # The batch that "failed" was committed after all: its retried entries are stored already.
            stored = {id(p) for p in batch if p.seq and p.done is None}
            batch[:] = [p for p in batch if id(p) not in stored]
        self._unsure_head = None
        return head

    async def _write(self, batch: list[_Pending]) -> None:
        seq, prev = await self._current_head(batch)
        if not batch:
            return
        now = utcnow()
        stamp = utc_text(now)
        key = self._key
        rows: list[dict[str, Any]] = []
        documents: list[bytes] = []
        if self._postgres:
            instance, stamp_json = _json_text(self.instance), '"' + stamp + '"'
            for p in batch:
                f = p.facts
                seq += 1
                p.seq = seq
                d = f._prepared or _prepare(f, self._redact)
                text = _document(d, instance, f.intent_seq, f.outcome, stamp_json, seq)
                mac = hmac.digest(key, prev.encode("ascii") + text + b"}", "sha256").hex()
                # The row as PostgreSQL stores it: the keyed document itself, plus the two MACs.
                documents.append(b'%s,"prev_mac":"%s","mac":"%s"}' % (text, prev.encode(), mac.encode()))
                prev = mac
        else:
            for p in batch:
                f = p.facts
                seq += 1
                p.seq = seq
                d = f._prepared or _prepare(f, self._redact)
                fields: dict[str, Any] = {
                    "instance": self.instance,
                    "seq": seq,
                    "recorded_at": stamp,
                    "request_id": d.request_id,
                    "principal": d.principal,
                    "role": f.role,
                    "caller_municipality": d.caller_municipality,
                    "institution": d.institution,
                    "municipality": d.municipality,
                    "action": f.action,
                    "resource": d.resource,
                    "legal_basis": f.legal_basis,
                    "outcome": f.outcome,
                    "intent_seq": f.intent_seq,
                }
                mac = entry_mac(key, prev, fields, recorded_at=stamp)
                rows.append({**fields, "recorded_at": now, "prev_mac": prev, "mac": mac})
                prev = mac
        self._unsure_head = (seq, prev)
        started = time.perf_counter()
        if self._postgres:
            await self._store_autocommit((b"[" + b",".join(documents) + b"]").decode())
        else:
            async with self._databases.main.sessionmaker() as session, session.begin():
                await AuditRepository(session).add_many(rows)
        AUDIT_BATCH_SECONDS.observe(time.perf_counter() - started)
        AUDIT_ENTRIES.inc(len(batch))
        self._head = (seq, prev)
        await self._anchors.write(self.instance, Anchor(seq, prev))
        self._unsure_head = None
        self.batches += 1


class AuditChains:
    """Several :class:`AuditTrail` chains of one gateway process, written in parallel.

    One chain is written one batch at a time, so alone its rate is (entries a batch) / (time to store a batch),
    and a request that arrives while a batch commits waits for that commit and then its own. Chains are
    independent (each its own head, anchor and connection); intents and refusals go to whichever chain's writer
    is free first (:class:`_Work`), so with two chains a request waits for one commit, not up to two, and under
    load the chains' commits overlap and PostgreSQL flushes them together. Chain ``k`` is named ``<instance>``
    for k = 0 and ``<instance>.<k>`` after that. A request's outcome goes to the chain that stored its intent.
    """

    def __init__(self, trails: list[AuditTrail]) -> None:
        if not trails:
            raise ValueError("at least one audit chain")
        self.trails = trails
        self._work = _Work()
        for trail in trails:
            trail._share(self._work)
        self._timeout = max(trail.timeout for trail in trails)

    @staticmethod
    def names(instance: str, count: int) -> list[str]:
        return [instance if k == 0 else f"{instance}.{k}" for k in range(count)]

    def _running(self) -> None:
        if not any(trail.running() for trail in self.trails):
            raise AuditUnavailable("the audit writer is not running")

    async def append(self, facts: AuditFacts, *, late_outcome: int = 503) -> tuple[AuditTrail, int]:
        """Store ``facts`` in whichever chain is free first: (that chain, the seq). See :meth:`AuditTrail.append`."""
        self._running()
        pending = _Pending(facts, self.trails[0]._loop().create_future())
        seq = await _stored(pending, self._work.put, self._timeout, late_outcome)
        assert pending.stored_by is not None
        return pending.stored_by, seq

    def record(self, facts: AuditFacts) -> None:
        """Hand ``facts`` (not an outcome: that goes to its intent's chain) to any chain, without waiting."""
        self._running()
        self._work.put(_Pending(facts, None))

    async def start(self) -> None:
        for trail in self.trails:
            await trail.start()

    async def stop(self) -> None:
        await asyncio.gather(*(trail.stop() for trail in self.trails))
        if lost := _drain(self._work.queue):
            log.error("audit writers stopped with %d entries not stored", lost)

    async def flush(self, *, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(trail.flush() for trail in self.trails))

    @property
    def batches(self) -> int:
        return sum(trail.batches for trail in self.trails)


# --- verification --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    instance: str
    seq: int
    what: str

    def __str__(self) -> str:
        return f"chain {self.instance}: {self.what} at seq {self.seq}"


async def verify_chain(
    session: AsyncSession, key: bytes, instance: str, anchor: Anchor | None, *, page_size: int = 1000
) -> tuple[list[Problem], int]:
    """(problems, entries checked) for one chain: the first break in it, and whether it reaches its anchor. A chain
    retention cut is checked from its cut: the cut's own MAC, then the entry after it keyed onto the cut's."""
    repo = AuditRepository(session)
    expected, prev = 1, GENESIS_MAC
    reached_anchor = anchor is None
    if (cut := await repo.cut(instance)) is not None:
        if not cut_is_genuine(key, cut):
            return [Problem(instance, cut["seq"], "cut changed (MAC does not match)")], 0
        expected, prev = cut["seq"] + 1, cut["mac"]
        if anchor is not None and anchor.seq <= cut["seq"]:
            if not anchor_holds(anchor, cut, None):
                return [Problem(instance, anchor.seq, "cut differs from the anchored head")], 0
            reached_anchor = True
    first = expected
    while rows := await repo.page(instance=instance, after_seq=expected - 1, limit=page_size):
        for row in rows:
            if row["seq"] != expected:
                return [Problem(instance, expected, "entry missing")], expected - first
            if row["prev_mac"] != prev or not hmac.compare_digest(row["mac"], entry_mac(key, prev, row)):
                return [Problem(instance, expected, "entry changed (MAC does not match)")], expected - first
            if anchor is not None and row["seq"] == anchor.seq:
                if row["mac"] != anchor.mac:
                    return [Problem(instance, expected, "entry differs from the anchored head")], expected - first + 1
                reached_anchor = True
            prev = row["mac"]
            expected += 1
    checked = expected - first
    if not reached_anchor:
        assert anchor is not None
        return [Problem(instance, expected, f"truncated: the anchored head is seq {anchor.seq}")], checked
    return [], checked


async def verify_trail(session: AsyncSession, key: bytes, anchors: AnchorStore) -> tuple[list[Problem], int]:
    """Every chain in the table or among the anchors: (problems, entries checked)."""
    anchored = await anchors.all()
    instances = sorted(set(await AuditRepository(session).instances()) | set(anchored))
    problems: list[Problem] = []
    total = 0
    for instance in instances:
        found, checked = await verify_chain(session, key, instance, anchored.get(instance))
        problems += found
        total += checked
    return problems, total


# --- reading -------------------------------------------------------------------------------------------

READ_LIMIT = 1000


def entry_out(row: Mapping[Any, Any]) -> dict[str, Any]:
    """An entry as a municipality reads it (the MACs stay internal)."""
    return {
        "instance": row["instance"],
        "seq": row["seq"],
        "recorded_at": utc_text(row["recorded_at"]),
        "request_id": row["request_id"],
        "principal": row["principal"],
        "role": row["role"],
        "caller_municipality": row["caller_municipality"],
        "institution": row["institution"],
        "municipality": row["municipality"],
        "action": row["action"],
        "resource": row["resource"],
        "legal_basis": row["legal_basis"],
        "outcome": row["outcome"],
        "intent_seq": row["intent_seq"],
    }


def page_parameters(after: str | None, limit: str | None) -> tuple[tuple[str, int] | None, int]:
    """The ``after`` (``<instance>:<seq>`` of the last entry read) and ``limit`` query parameters of the audit read; a
    bad one is :class:`InvalidField` naming it."""
    position = None
    if after:
        instance, _, seq = after.rpartition(":")
        if not instance or not seq.isdigit() or int(seq) < 1:
            raise InvalidField("after", "must be <instance>:<seq> of an entry, as `next` gives it")
        position = (instance, int(seq))
    size = READ_LIMIT
    if limit:
        if not limit.isdigit() or not 1 <= int(limit) <= READ_LIMIT:
            raise InvalidField("limit", f"must be a whole number from 1 to {READ_LIMIT}")
        size = int(limit)
    return position, size


async def entries_of_municipality(
    databases: Databases,
    code: str,
    *,
    since: datetime | None,
    until: datetime | None,
    after: tuple[str, int] | None = None,
    limit: int = READ_LIMIT,
) -> tuple[list[dict[str, Any]], bool]:
    """(entries about ``code``'s data or made by it, oldest first, from just after the entry ``after`` (instance,
    seq); whether more follow). ``after`` must be an entry of this municipality's trail, else it is an
    :class:`InvalidField`: another's would tell when that municipality was read or read something."""
    async with databases.main.sessionmaker() as session:
        audit = AuditRepository(session)
        position = None
        if after is not None:
            position = await audit.position(code, *after)
            if position is None:
                raise InvalidField("after", "not an entry of this municipality's audit trail")
        rows = await audit.of_municipality(code, since=since, until=until, after=position, limit=limit + 1)
    return [entry_out(r) for r in rows[:limit]], len(rows) > limit
