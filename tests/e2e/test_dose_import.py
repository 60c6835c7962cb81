"""A mass vaccination site uploads a day's dose CSV with ``vrs doses import``, through the gateway, on both
stacks: a progress bar, each bad row named, the good rows recorded, the status shown only
to the sender."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from devtools.launcher import Stack
from devtools.tokens import identity_token
from shared.auth import Role
from shared.domain.coupon import compose_coupon_line

INSTITUTION = "1312345678"


def coupon(number: int) -> str:
    return compose_coupon_line(kind=1, dose_number=0, municipality_code="131016", coupon_number=f"{number:010d}")


def test_vrs_doses_import_uploads_and_follows_the_file(stack: Stack, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    base = uuid.uuid4().int % 10**8 * 10 + 1
    rows = [
        f"{tag}-{i},{coupon(base + i)},1,2021-07-0{1 + i % 9},pfizer,EY{i % 10000:04d},会場,,false" for i in range(40)
    ]
    rows.append(f"{tag}-bad,{coupon(base + 99)},1,2021-07-01,pfizer,EY0001,会場,,maybe")
    csv = tmp_path / "doses.csv"
    csv.write_text("client_id,coupon,dose_number,vaccinated_on,vaccine,lot_number,venue,doctor,medical_worker\n"
                   + "\n".join(rows) + "\n", encoding="utf-8")  # fmt: skip
    token = identity_token(role=Role.INSTITUTION, institution=INSTITUTION)
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "doses", "import", str(csv), "--gateway", stack.url(), "--token", token],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr  # one row failed
    assert "row 42: medical_worker: must be true, false, 1, 0 or empty" in result.stdout
    assert "40 rows recorded, 1 failed" in result.stderr
    assert "[##############################] 41/41 done" in result.stderr
    import_id = result.stderr.split("import ", 1)[1].split()[0]
    other = identity_token(role=Role.INSTITUTION, institution="1319999999")
    with httpx.Client(base_url=stack.url(), timeout=30) as gw:
        mine = gw.get(f"/api/v1/dose-imports/{import_id}", headers={"Authorization": f"Bearer {token}"})
        theirs = gw.get(f"/api/v1/dose-imports/{import_id}", headers={"Authorization": f"Bearer {other}"})
    assert mine.status_code == 200 and mine.json()["rows_ok"] == 40
    assert (mine.json()["status"], mine.json()["phase"]) == ("done", "done")  # the resident import's shape
    assert theirs.status_code == 404
