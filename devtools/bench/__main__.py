"""``python -m devtools.bench [AREA ...] [-- options of that area]``: run the benchmark areas in turn."""

from __future__ import annotations

import importlib
import itertools
import sys

AREAS = ("records", "gateway", "registry", "stats", "loops")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # Areas come first; after the first option every word is the area's (``gateway --upstream records``).
    named = list(itertools.takewhile(lambda a: a in AREAS, args))
    areas = named or list(AREAS)
    rest = args[len(named) :]
    if rest and len(areas) != 1:
        # Options belong to one area (``python -m devtools.bench records --help``); a bench run is minutes
        # of load, never the answer to a mistyped option.
        print(f"usage: python -m devtools.bench [{'|'.join(AREAS)} ...] [options of one area]", file=sys.stderr)
        print(
            "  options (and --help) go with exactly one area, e.g. python -m devtools.bench records --help",
            file=sys.stderr,
        )
        return 0 if set(rest) <= {"-h", "--help"} else 2
    status = 0
    for area in areas:
        print(f"\n=== bench: {area} ===", flush=True)
        module = importlib.import_module(f"devtools.bench.{area}")
        status = max(status, int(module.main(rest if len(areas) == 1 else [])))
    return status


if __name__ == "__main__":
    sys.exit(main())
