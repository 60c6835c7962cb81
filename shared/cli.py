"""The ``vrs`` command: what an operator runs beside the services.

Runtime subcommands come from here and from each service's ``cli.py``: ``register(subparsers)`` adds the
service's own commands, and its ``relay()`` / ``consume()`` functions are the worker processes that
``vrs relay <service>`` and ``vrs consume <service>`` run; the
developer's subcommands (``run``, ``token``, ``seed``, ``bench``) come from :mod:`devtools` when it is
importable — a checkout with ``make``'s virtualenv — and are absent from the production image.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import sys
from collections.abc import Callable

from sqlalchemy import select

from shared.migrations import SERVICES, migrate_all
from shared.shardmove import MoveSpec, ShardMoveError, move_municipality


def _migrate(_: argparse.Namespace) -> int:
    migrate_all()
    return 0


def _workers(kind: str) -> dict[str, Callable[[], None]]:
    """The services whose ``cli`` module has a ``relay`` (or ``consume``) worker entry point."""
    found = {}
    for spec in SERVICES:
        if importlib.util.find_spec(f"services.{spec.name}.cli") is not None:
            worker = getattr(importlib.import_module(f"services.{spec.name}.cli"), kind, None)
            if worker is not None:
                found[spec.name] = worker
    return found


def _run_worker(kind: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        # Workers on uvloop, as uvicorn runs the APIs: with asyncio's own loop a coupon consumer spent 46 % of
        # its samples in its socket transport's write (py-spy, the stats bench's seeding).
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        _workers(kind)[args.service]()
        return 0

    return run


def _shard_movers() -> list[MoveSpec]:
    """Each sharded service's declaration of what a municipality owns, in fencing order (registry first)."""
    movers = []
    for spec in SERVICES:
        if spec.sharded and importlib.util.find_spec(f"services.{spec.name}.cli") is not None:
            factory = getattr(importlib.import_module(f"services.{spec.name}.cli"), "shard_mover", None)
            if factory is not None:
                movers.append(factory())
    return movers


async def _shards_move(code: str, to: str) -> int:
    movers = _shard_movers()
    try:
        moves = await move_municipality(movers, code, to, progress=lambda line: print(line, file=sys.stderr))
    except ShardMoveError as exc:
        print(f"shard move failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for mover in movers:
            await mover.databases.dispose()
    if not moves:
        print(f"{code} is already on {to}", file=sys.stderr)
    for service, move in moves.items():
        print(f"{service}: {code} {move['from_shard']} → {move['to_shard']}, write pause {move['pause_seconds']:.3f}s")
    return 0


async def _shards_status() -> int:
    for mover in _shard_movers():
        try:
            async with mover.databases.main.sessionmaker() as session:
                a = (await session.execute(select(mover.assignments))).all()
                moves = (await session.execute(select(mover.moves).where(mover.moves.c.state != "done"))).all()
            counts: dict[str, int] = {}
            for row in a:
                counts[row.shard] = counts.get(row.shard, 0) + 1
            print(mover.service, " ".join(f"{s}={n}" for s, n in sorted(counts.items())))
            for m in moves:
                print(f"  unfinished: {m.municipality_code} {m.from_shard} → {m.to_shard} ({m.state})")
        finally:
            await mover.databases.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vrs", description="VRS — Vaccination Record System")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    migrate = sub.add_parser("migrate", help="apply migrations to every database the environment configures")
    migrate.set_defaults(func=_migrate)

    relay = sub.add_parser("relay", help="publish a service's outbox to its topic (a process of its own)")
    relay.add_argument("service", choices=sorted(_workers("relay")))
    relay.set_defaults(func=_run_worker("relay"))
    consume = sub.add_parser("consume", help="apply a topic's events to a service's database (a process of its own)")
    consume.add_argument("service", choices=sorted(_workers("consume")))
    consume.set_defaults(func=_run_worker("consume"))

    shards = sub.add_parser("shards", help="municipalities and the database shards that hold them")
    shards_sub = shards.add_subparsers(required=True, metavar="ACTION")
    move = shards_sub.add_parser(
        "move",
        help="move one municipality (registry's and records' rows) to another shard while the services run; "
        "run it again to resume an interrupted move",
    )
    move.add_argument("--municipality", required=True, help="6-digit municipality code")
    move.add_argument("--to", required=True, help="the shard's name, as in VRS_<SERVICE>_SHARD_DSNS")
    move.set_defaults(func=lambda args: asyncio.run(_shards_move(args.municipality, args.to)))
    status = shards_sub.add_parser("status", help="municipalities per shard, and moves not finished")
    status.set_defaults(func=lambda _: asyncio.run(_shards_status()))

    for spec in SERVICES:
        if importlib.util.find_spec(f"services.{spec.name}.cli") is not None:
            register = getattr(importlib.import_module(f"services.{spec.name}.cli"), "register", None)
            if register is not None:
                register(sub)
    # The production image ships no developer tooling.
    if importlib.util.find_spec("devtools") is not None:
        importlib.import_module("devtools.cli").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
