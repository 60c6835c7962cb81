"""The CPU side of a bulk resident import, run in worker processes: check a chunk of raw CSV rows, seal and
hash their My Numbers and write, for each good row, the ``COPY`` text lines of a resident that is new.

What ends up stored is exactly what :func:`services.registry.service.import_rows` stores for a resident
seen for the first time (version 1, its coupon issued, one history entry, one ``coupon.issued`` event in the
outbox, its directory entry); the importer decides which rows are new and sends the others down that path.
No pydantic or ORM per row: a chunk of 5,000 rows is a few string joins. Nothing here logs, and no line
holds a My Number in the clear.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from json.encoder import encode_basestring

from services.registry.crypto import MyNumberVault, VaultKeys
from shared.domain.csv_stream import Parsed, RowError
from shared.domain.resident_csv import CheckedValues, RawRow, check_values, int_keys
from shared.ids import random_uuid_strings

# Column lists of the COPYs, in the order the lines below write them.
RESIDENT_COLUMNS = (
    "municipality_code", "resident_id", "name", "name_kana", "birth_date", "sex", "address", "coupon_number",
    "my_number_key_id", "my_number_ciphertext", "my_number_hash", "my_number_last4", "version", "created_at",
    "updated_at",
)  # fmt: skip
COUPON_COLUMNS = (
    "municipality_code", "coupon_number", "resident_id", "sex", "birth_date", "version", "created_at", "updated_at",
)  # fmt: skip
HISTORY_COLUMNS = ("municipality_code", "resident_id", "version", "changed_by", "changed_at", "changes")
OUTBOX_COLUMNS = ("event_id", "key", "payload", "created_at")
DIRECTORY_COLUMNS = ("my_number_hash", "municipality_code", "resident_id", "updated_at")

NULL = "\\N"
quote = encode_basestring  # a JSON string, non-ASCII as is (C)
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def text(value: str | None) -> str:
    """A value as COPY's text format writes it."""
    if value is None:
        return NULL
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_ESCAPES)
    return value


def blob(value: bytes) -> str:
    return "\\\\x" + value.hex()  # bytea's hex form, its backslash escaped for COPY


@dataclass(frozen=True, slots=True)
class ChunkJob:
    """One chunk for a worker: the rows and what every line of it shares."""

    municipality_code: str
    changed_by: str
    now: str  # ISO timestamp of the batch, UTC
    today: date  # Japan's day, for birth dates in the future
    rows: list[Parsed[RawRow]]
    keys_only: bool = False  # a resumed import re-reading committed rows: their keys are all it needs


@dataclass(slots=True)
class Lines:
    """One table's COPY lines of a chunk as one block, ``ends[k]`` where its ``k``-th line ends (empty for a row
    without one): a block crosses the process boundary as one bytes object, not thousands of strings. The
    ``k``-th line is row ``k``'s, or with ``rows``, row ``rows[k]``'s (lines in another order than the rows)."""

    data: bytes = b""
    ends: array[int] = field(default_factory=lambda: array("L"))
    rows: array[int] | None = None

    @classmethod
    def of(cls, lines: list[str]) -> Lines:
        encoded = [line.encode() for line in lines]
        return cls(b"".join(encoded), array("L", itertools.accumulate(map(len, encoded))))

    @classmethod
    def sorted_of(cls, lines: list[str]) -> Lines:
        """The lines in sorted order (a table's key first on each line: in key order)."""
        order = sorted(range(len(lines)), key=lines.__getitem__)
        block = cls.of([lines[i] for i in order])
        block.rows = array("L", order)
        return block

    def _at(self, keep: Sequence[int]) -> list[int]:
        """The positions of the lines of the rows at ``keep``: in the rows' order, or the lines' own."""
        if self.rows is None:
            return list(keep)
        kept = set(keep)
        return [k for k, row in enumerate(self.rows) if row in kept]

    def pieces(self, keep: Sequence[int]) -> list[bytes]:
        data, ends = self.data, self.ends
        return [piece for k in self._at(keep) if (piece := data[ends[k - 1] if k else 0 : ends[k]])]

    def take(self, keep: Sequence[int]) -> bytes:
        """The lines of the rows at ``keep`` as one COPY payload (in ``keep``'s order, or the lines' own)."""
        if len(keep) == len(self.ends):
            return self.data
        data, ends = self.data, self.ends
        return b"".join([data[ends[k - 1] if k else 0 : ends[k]] for k in self._at(keep)])


@dataclass(slots=True)
class PreparedChunk:
    """A worker's answer, index-aligned with the job's rows. ``errors[i]`` is None for a good row; then
    ``resident_ids``/``hashes``/``coupons`` are set and each table's lines hold the row's line (if any)."""

    now: str = ""  # the job's
    numbers: list[int] = field(default_factory=list)
    errors: list[list[RowError] | None] = field(default_factory=list)
    # Each row's keys for the repeats in the file (Repeats.check_chunk): its resident id if valid, and the
    # ints of its id, My Number and coupon number (0: none). Arrays: a chunk's keys cross the process boundary
    # as three blocks, not thousands of tuples.
    id_texts: list[str | None] = field(default_factory=list)
    id_keys: array[int] = field(default_factory=lambda: array("Q"))
    number_keys: array[int] = field(default_factory=lambda: array("Q"))
    coupon_keys: array[int] = field(default_factory=lambda: array("Q"))
    resident_ids: list[str | None] = field(default_factory=list)
    hashes: list[bytes | None] = field(default_factory=list)
    coupons: list[str | None] = field(default_factory=list)
    residents: Lines = field(default_factory=Lines)
    coupon_lines: Lines = field(default_factory=Lines)
    history: Lines = field(default_factory=Lines)
    outbox: Lines = field(default_factory=Lines)  # each row's coupon event (JSON), not a COPY line
    directory: Lines = field(default_factory=Lines)


_vault: MyNumberVault | None = None


def init_worker(keys: VaultKeys) -> None:
    """The pool's initializer: each worker process holds its own vault."""
    global _vault
    _vault = MyNumberVault.from_keys(keys)


def prepare_in_worker(job: ChunkJob) -> PreparedChunk:
    assert _vault is not None, "init_worker was not run"
    return prepare(job, _vault)


def prepare(job: ChunkJob, vault: MyNumberVault) -> PreparedChunk:
    out = PreparedChunk(now=job.now)
    good: list[tuple[int, CheckedValues]] = []
    id_texts: list[str | None] = []
    id_keys: list[int] = []
    number_keys: list[int] = []
    coupon_keys: list[int] = []
    for number, values in job.rows:
        out.numbers.append(number)
        if isinstance(values, list):
            out.errors.append(values)
            id_texts.append(None)
            id_keys.append(0)
            number_keys.append(0)
            coupon_keys.append(0)
            continue
        result, keys = check_values(values, job.today)
        id_key, number_key, coupon_key = int_keys(keys)
        id_texts.append(keys[0])
        id_keys.append(id_key)
        number_keys.append(number_key)
        coupon_keys.append(coupon_key)
        if isinstance(result, list):
            out.errors.append(result)
        else:
            out.errors.append(None)
            good.append((len(out.errors) - 1, result))
    out.id_texts = id_texts
    out.id_keys, out.number_keys, out.coupon_keys = (
        array("Q", id_keys),
        array("Q", number_keys),
        array("Q", coupon_keys),
    )
    size = len(out.numbers)
    out.resident_ids, out.hashes, out.coupons = [None] * size, [None] * size, [None] * size
    if job.keys_only:
        return out
    residents, coupons, histories, events, directory = ([""] * size for _ in range(5))
    code, now = job.municipality_code, job.now
    sealed = iter(vault.seal_many([(r[5], f"{code}/{r[0]}") for _, r in good if r[5] is not None]))
    key_id = vault.active_key
    occurred = now.replace("+00:00", "Z")
    next_id = iter(random_uuid_strings(sum(1 for _, r in good if r[7] is not None))).__next__
    changed_by = text(job.changed_by)
    for i, (rid, name, name_kana, birth_date, row_sex, my_number, address, coupon) in good:
        born = birth_date.isoformat() if birth_date is not None else None
        sex = row_sex.value
        # The history entry of a first version, as service.history_changes(None, ...) makes it (the unit
        # test compares them), written as JSON directly: json.dumps of a dict per row was a third of a worker.
        changes = (
            f'{{"name":{{"before":null,"after":{quote(name)}}},"name_kana":{{"before":null,"after":{quote(name_kana)}}}'
        )
        if born is not None:
            changes += f',"birth_date":{{"before":null,"after":"{born}"}}'
        changes += f',"sex":{{"before":null,"after":"{sex}"}}'
        if address is not None:
            changes += f',"address":{{"before":null,"after":{quote(address)}}}'
        if coupon is not None:
            changes += f',"coupon_number":{{"before":null,"after":"{coupon}"}}'
        if my_number is not None:
            ciphertext, keyed_hash = next(sealed)
            last4 = my_number[-4:]
            changes += f',"my_number":{{"changed":true,"last4":"{last4}"}}'
            hashed = blob(keyed_hash)
            mn = f"{key_id}\t{blob(ciphertext)}\t{hashed}\t{last4}"
            out.hashes[i] = keyed_hash
            directory[i] = f"{hashed}\t{code}\t{rid}\t{now}\n"
        else:
            mn = f"{NULL}\t{NULL}\t{NULL}\t{NULL}"
        out.resident_ids[i] = rid
        residents[i] = (
            f"{code}\t{rid}\t{text(name)}\t{text(name_kana)}\t{born or NULL}\t{sex}\t{text(address)}\t"
            f"{coupon or NULL}\t{mn}\t1\t{now}\t{now}\n"
        )
        histories[i] = f"{code}\t{rid}\t1\t{changed_by}\t{now}\t{text(changes + '}')}\n"
        if coupon is not None:
            out.coupons[i] = coupon
            coupons[i] = f"{code}\t{coupon}\t{rid}\t{sex}\t{born or NULL}\t1\t{now}\t{now}\n"
            event_id = next_id()
            birth = f'"{born}"' if born is not None else "null"
            # CouponEvent.to_bytes() of a coupon.issued, version 1 (tests/unit/services/registry compares them).
            payload = (
                f'{{"schema_version":1,"event_id":"{event_id}","occurred_at":"{occurred}","municipality":"{code}",'
                f'"type":"coupon.issued","coupon_number":"{coupon}","version":1,"state":{{"resident_id":"{rid}",'
                f'"sex":"{sex}","birth_date":{birth},"invalid_from":null,"invalid_reason":null}}}}'
            )
            events[i] = payload
    out.residents, out.coupon_lines, out.history = Lines.of(residents), Lines.of(coupons), Lines.of(histories)
    # The directory's key is the keyed hash, random: entries in key order touch its index's pages in order
    # (PostgreSQL's CPU for the directory's COPY: 4.0 → 3.1 µs an entry at 300,000 entries, more as it grows).
    out.outbox, out.directory = Lines.of(events), Lines.sorted_of(directory)
    return out


# Coupon events per outbox row (one bus message): ~330 bytes each, well under Kafka's 1 MB message limit. The
# same as shared.events.EVENTS_PER_MESSAGE, not imported from there: the workers do not load pydantic.
EVENTS_PER_MESSAGE = 1000


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# COPY's binary format: signature, flags, header extension length; a tuple count of -1 ends the data.
BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
BINARY_TRAILER = b"\xff\xff"


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def outbox_copy(municipality_code: str, events: list[bytes], now: str) -> bytes:
    """A binary ``COPY`` (``OUTBOX_COLUMNS``) of the outbox rows carrying ``events`` (JSON objects) as JSON
    arrays of up to :data:`EVENTS_PER_MESSAGE` (see :func:`shared.events.coupon_events_from_bytes`); empty
    without events. Binary because a payload is ~330 kB: as hex text it cost PostgreSQL 2.9 µs of CPU per
    event, as much as a whole table's row; binary, 0.7–0.9 µs."""
    if not events:
        return b""
    micros = (datetime.fromisoformat(now) - _PG_EPOCH) // timedelta(microseconds=1)
    shared = _field(municipality_code.encode()), _field(micros.to_bytes(8, "big", signed=True))
    parts = [BINARY_HEADER]
    for start in range(0, len(events), EVENTS_PER_MESSAGE):
        payload = b"[" + b",".join(events[start : start + EVENTS_PER_MESSAGE]) + b"]"
        parts += [b"\x00\x04", _field(random_uuid_strings(1)[0].encode()), shared[0], _field(payload), shared[1]]
    parts.append(BINARY_TRAILER)
    return b"".join(parts)
