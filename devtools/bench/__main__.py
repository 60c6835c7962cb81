"""``python -m devtools.bench [AREA ...] [-- options of that area]``: run the benchmark areas in turn."""

from __future__ import annotations

import importlib
import sys

AREAS = ("records", "gateway", "registry", "stats")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    areas = [a for a in args if a in AREAS] or list(AREAS)
    rest = [a for a in args if a not in AREAS]
    status = 0
    for area in areas:
        print(f"\n=== bench: {area} ===", flush=True)
        module = importlib.import_module(f"devtools.bench.{area}")
        status = max(status, int(module.main(rest if len(areas) == 1 else [])))
    return status


if __name__ == "__main__":
    sys.exit(main())
