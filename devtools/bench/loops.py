"""``make bench`` (loops): what the background loops cost per turn, on PostgreSQL — a relay's pass over a shard's
outbox and a stats consumer's batch — through a SQLAlchemy session and on the asyncpg connection itself.

Below full speed nothing batches: a relay pass or a consumer batch carries a dose or two, so each turn's fixed
cost is paid per dose (at 216 single doses/s on the 2-core bench, the relay was a fifth of records' CPU). This
measures that cost alone, without HTTP, Kafka or other processes: this process's CPU time
(``time.process_time``) per turn, with one event and with 20 a turn, each way in alternating rounds. The
publisher is a null one (it keeps the messages), so the figures are the database side of a pass; the consumer
batch is decoding the events, claiming their ids, adding the counts and storing the offsets, with its commit.

    python -m devtools.bench loops [--turns 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from pathlib import Path

import uvloop

from devtools.harness import free_port, scratch_directory
from devtools.harness.postgres import PostgresServer, production_pg_settings
from services.records.models import outbox
from services.stats import service
from services.stats.models import consumer_bookkeeping
from shared.bus import Message, OutgoingMessage
from shared.consumer import Bookkeeping, DriverBookkeeping, next_offsets
from shared.db import Database, Databases, utcnow
from shared.domain.age import AgeBand
from shared.events import DoseEvent, DoseEventType, StatsCell
from shared.migrations import upgrade
from shared.outbox import OutboxRelay, OutboxRepository

ROOT = Path(__file__).resolve().parents[2]
SIZES = (1, 20)
CELL = StatsCell(
    date=date(2021, 6, 1),
    prefecture="13",
    municipality="131016",
    sex="F",
    age_band=AgeBand.UNDER_65,
    medical_worker=False,
    dose_number=1,
    vaccine="pfizer",
)


def recorded() -> DoseEvent:
    return DoseEvent(
        type=DoseEventType.RECORDED, dose_id=uuid.uuid4(), municipality=CELL.municipality, cell=CELL, previous_cell=None
    )


class NullPublisher:
    """Takes every message at once: the pass's cost is the database's side."""

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        pass

    async def close(self) -> None:
        pass


def say(text: str) -> None:
    print(text, flush=True)


async def relay_turns(databases: Databases, turns: int, per: int, driver: bool) -> float:
    db = databases.shards["s0"]
    relay = OutboxRelay(databases, NullPublisher(), outbox, topic="dose-events", batch_size=500, idle_seconds=1)
    spent = 0.0
    for _ in range(turns):
        async with db.sessionmaker() as session, session.begin():
            await OutboxRepository(session, outbox).add([recorded() for _ in range(per)])
        started = time.process_time()
        published = await (relay.publish_on_connection(db) if driver else relay.publish_through_session(db))
        spent += time.process_time() - started
        assert published == per, (published, per)
    return spent / turns


class Offsets:
    next = 0


async def consumer_turns(db: Database, turns: int, per: int, driver: bool) -> float:
    spent = 0.0
    for _ in range(turns):
        events = [recorded() for _ in range(per)]
        messages = []
        for e in events:
            messages.append(Message(partition=0, offset=Offsets.next, key=e.key, value=e.to_bytes()))
            Offsets.next += 1
        started = time.process_time()
        if driver:
            async with db.driver_transaction() as connection:
                await service.apply_messages(connection, consumer="stats", topic="t", messages=messages, now=utcnow())
                await DriverBookkeeping(connection, consumer_bookkeeping).store_offsets(
                    "stats", "t", next_offsets(messages), at=utcnow()
                )
        else:
            async with db.sessionmaker() as session, session.begin():
                await service.apply_messages(session, consumer="stats", topic="t", messages=messages, now=utcnow())
                await Bookkeeping(session, consumer_bookkeeping).store_offsets(
                    "stats", "t", next_offsets(messages), at=utcnow()
                )
        spent += time.process_time() - started
    return spent / turns


async def measure(pg: PostgresServer, args: argparse.Namespace) -> None:
    databases = Databases.connect(pg.dsn("records_main"), {"s0": pg.dsn("records_s0")}, pool_size=4)
    stats = Database.connect(pg.dsn("stats_main"), pool_size=4)
    loops: dict[str, Callable[[int, int, bool], Awaitable[float]]] = {
        "relay pass": lambda turns, per, driver: relay_turns(databases, turns, per, driver),
        "stats batch": lambda turns, per, driver: consumer_turns(stats, turns, per, driver),
    }
    try:
        for name, loop in loops.items():
            for per in SIZES:
                await loop(20, per, False)  # warm: statement caches, prepared statements
                await loop(20, per, True)
                results: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.rounds):
                    for driver in (False, True):
                        results[driver].append(await loop(args.turns, per, driver))
                session, driver_cpu = (statistics.median(results[k]) * 1e6 for k in (False, True))
                say(
                    f"{name:12s} {per:3d} event{'s' if per > 1 else ' '} a turn   session {session:6.0f} µs   "
                    f"asyncpg connection {driver_cpu:6.0f} µs   ratio {driver_cpu / session:.2f}"
                )
    finally:
        await databases.dispose()
        await stats.engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.bench loops")
    parser.add_argument("--turns", type=int, default=300, help="passes or batches a measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements each way (median)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    with scratch_directory("vrs-bench-loops-", keep=args.keep, say=say) as tmp:
        pg = PostgresServer(
            tmp / "postgres", free_port(), log_path=tmp / "postgres.log", settings=production_pg_settings()
        )
        pg.start()
        try:
            for name, tree in (("records_main", "records/migrations/main"), ("records_s0", "records/migrations/shard")):
                pg.create_database(name)
                upgrade(pg.dsn(name), ROOT / "services" / tree)
            pg.create_database("stats_main")
            upgrade(pg.dsn("stats_main"), ROOT / "services" / "stats" / "migrations" / "main")
            say(f"CPU of this process a turn (median of {args.rounds} × {args.turns} turns each way), PostgreSQL")
            uvloop.run(measure(pg, args))
        finally:
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
