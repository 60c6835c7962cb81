"""The ``vrs`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shared.auth import Role, mint_token
from shared.settings import AuthSettings


def _token(args: argparse.Namespace) -> int:
    try:
        token = mint_token(
            AuthSettings(),
            role=Role(args.role),
            subject=args.subject,
            municipality=args.municipality,
            institution=args.institution,
            ttl_seconds=args.ttl,
        )
    except ValueError as exc:
        print(f"vrs token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _run(args: argparse.Namespace) -> int:
    from services.launcher import run

    try:
        return run(full=args.full, var=Path(args.var), seed=not args.no_seed)
    except KeyboardInterrupt:  # stopped while starting: everything started so far was stopped on the way out
        print("\nStopped.", file=sys.stderr)
        return 130


def _migrate(_: argparse.Namespace) -> int:
    from services.stack import migrate_all

    migrate_all()
    return 0


def _seed(args: argparse.Namespace) -> int:
    from services.demo import seed_demo

    seed_demo(args.gateway)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vrs", description="VRS — Vaccination Record System")
    sub = parser.add_subparsers(required=True)

    token = sub.add_parser("token", help="print a development/test JWT signed with the configured key")
    token.add_argument("--role", required=True, choices=[r.value for r in Role if r is not Role.ANONYMOUS])
    token.add_argument("--municipality", help="6-digit municipality code (role municipality)")
    token.add_argument("--institution", help="10-digit medical institution code (role institution)")
    token.add_argument("--subject", help="the token's sub claim (default: the organisation code or role)")
    token.add_argument("--ttl", type=int, default=None, help="lifetime in seconds")
    token.set_defaults(func=_token)

    run = sub.add_parser("run", help="run every service on this machine (Ctrl-C stops)")
    run.add_argument("--full", action="store_true", help="PostgreSQL (2 shards) + Kafka instead of embedded")
    run.add_argument("--var", default=os.environ.get("VRS_VAR_DIR", "var"), help="data directory")
    run.add_argument("--no-seed", action="store_true", help="do not seed the demo data")
    run.set_defaults(func=_run)

    migrate = sub.add_parser("migrate", help="apply migrations to every database the environment configures")
    migrate.set_defaults(func=_migrate)

    seed = sub.add_parser("seed", help="seed the demo data through a running gateway (idempotent)")
    seed.add_argument("--gateway", default="http://127.0.0.1:8000")
    seed.set_defaults(func=_seed)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
