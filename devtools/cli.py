"""The developer's ``vrs`` subcommands: ``run``, ``token``, ``seed`` and ``bench``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from shared.auth import Role


def _token(args: argparse.Namespace) -> int:
    from devtools.tokens import identity_token

    try:
        token = identity_token(
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
    from devtools.launcher import run

    try:
        return run(full=args.full, var=Path(args.var), seed=not args.no_seed)
    except KeyboardInterrupt:  # stopped while starting: everything started so far was stopped on the way out
        print("\nStopped.", file=sys.stderr)
        return 130


def _seed(args: argparse.Namespace) -> int:
    from devtools.demo import seed_demo

    seed_demo(args.gateway)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from devtools.bench.__main__ import main

    return main(args.rest)


def register(sub: Any) -> None:
    token = sub.add_parser(
        "token", help="print a development/test identity token (ES256, the DEVELOPMENT key; production refuses it)"
    )
    token.add_argument("--role", required=True, choices=[r.value for r in Role if r is not Role.ANONYMOUS])
    token.add_argument("--municipality", help="6-digit municipality code (role municipality)")
    token.add_argument("--institution", help="10-digit medical institution code (role institution)")
    token.add_argument("--subject", help="the token's sub claim (default: the organisation code or role)")
    token.add_argument(
        "--ttl", type=int, default=None, help="lifetime in seconds (default 3600, the gateway's maximum)"
    )
    token.set_defaults(func=_token)

    run = sub.add_parser("run", help="run every service on this machine (Ctrl-C stops)")
    run.add_argument("--full", action="store_true", help="PostgreSQL (2 shards) + Kafka instead of embedded")
    run.add_argument("--var", default=os.environ.get("VRS_VAR_DIR", "var"), help="data directory")
    run.add_argument("--no-seed", action="store_true", help="do not seed the demo data")
    run.set_defaults(func=_run)

    seed = sub.add_parser("seed", help="seed the demo data through a running gateway (idempotent)")
    seed.add_argument("--gateway", default="http://127.0.0.1:8000")
    seed.set_defaults(func=_seed)

    bench = sub.add_parser("bench", help="benchmarks on PostgreSQL + Kafka; prints numbers")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="[records|gateway] [options]")
    bench.set_defaults(func=_bench)
