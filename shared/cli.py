"""The ``vrs`` command: what an operator runs beside the services.

Runtime subcommands come from here and from each service's ``cli.py`` (``register(subparsers)``); the
developer's subcommands (``run``, ``token``, ``seed``, ``bench``) come from :mod:`devtools` when it is
importable — a checkout with ``make``'s virtualenv — and are absent from the production image.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

from shared.migrations import SERVICES, migrate_all


def _migrate(_: argparse.Namespace) -> int:
    migrate_all()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vrs", description="VRS — Vaccination Record System")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    migrate = sub.add_parser("migrate", help="apply migrations to every database the environment configures")
    migrate.set_defaults(func=_migrate)

    for spec in SERVICES:
        if importlib.util.find_spec(f"services.{spec.name}.cli") is not None:
            importlib.import_module(f"services.{spec.name}.cli").register(sub)
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
