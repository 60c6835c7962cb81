"""Municipality names for what registry prints: the team's master file, read in place through a setting."""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path


@cache
def _names(path: Path) -> dict[str, str]:
    names: dict[str, str] = {}
    with path.open(encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            # "札幌市 中央区" in the file; printed as one name with its prefecture: 北海道札幌市中央区.
            names[row["lgcode"]] = row["pref"] + row["city"].replace(" ", "")
    return names


def municipality_name(code: str, master: Path | None) -> str:
    """The name of ``code``, or the code itself when the master file is not available."""
    if master is None or not master.is_file():
        return code
    return _names(master).get(code, code)
