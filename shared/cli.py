"""The ``vrs`` command: what an operator runs beside the services.

Runtime subcommands come from here and from each service's ``cli.py``: ``register(subparsers)`` adds the
service's own commands, and its ``relay()`` / ``consume()`` functions are the worker processes that
``vrs relay <service>`` and ``vrs consume <service>`` run; the
developer's subcommands (``run``, ``token``, ``seed``, ``bench``) come from :mod:`devtools` when it is
importable — a checkout with ``make``'s virtualenv — and are absent from the production image.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from collections.abc import Callable

from shared.migrations import SERVICES, migrate_all


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
        _workers(kind)[args.service]()
        return 0

    return run


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
