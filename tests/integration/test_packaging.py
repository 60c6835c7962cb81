"""What ships: the wheel and the image hold the four services and the shared runtime code, nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from devtools.harness import PROJECT_ROOT

TOOLING = ("devtools/", "harness", "bench", "launcher", "demo", "kafka-pom")


def test_the_wheel_contains_no_developer_tooling(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=PROJECT_ROOT,
        check=True,
    )
    [wheel] = tmp_path.glob("vrs-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.startswith("vrs-")}
    assert top == {"services", "shared"}
    assert {n.split("/")[1] for n in names if n.startswith("services/") and n.count("/") > 1} == {
        "registry",
        "records",
        "stats",
        "gateway",
    }
    assert [n for n in names if any(t in n for t in TOOLING)] == []
    # The services still carry their migration trees.
    assert any(n.startswith("services/records/migrations/shard/versions/") for n in names)


def test_the_image_copies_only_the_runtime_packages() -> None:
    copies = [
        line.split()[1] for line in (PROJECT_ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY")
    ]
    assert "devtools" not in " ".join(copies)
    assert {"shared", "services"} <= set(copies)


def test_services_holds_exactly_the_four_services() -> None:
    entries = {p.name for p in (PROJECT_ROOT / "services").iterdir() if not p.name.startswith("__")}
    assert entries == {"registry", "records", "stats", "gateway"}
