"""``vrs consume stats`` as the process the stats-consumer Deployment runs: it applies the topic, logs JSON
lines, serves its metrics (events applied, lag per partition) on VRS_STATS_METRICS_PORT, and stops on
SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from devtools.harness import free_port
from shared.bus import OutgoingMessage
from shared.bus.embedded import EmbeddedLog
from shared.settings import BusSettings
from tests.factories import metric_value, recorded
from tests.integration.services.stats.conftest import MIGRATIONS


def test_the_worker_applies_reports_and_stops(tmp_path: Path) -> None:
    from shared.migrations import upgrade

    dsn = f"sqlite+aiosqlite:///{tmp_path / 'stats.db'}"
    upgrade(dsn, MIGRATIONS)
    bus = BusSettings(topic="dose-events", partitions=2, embedded_path=tmp_path / "events" / "log.db")
    events = [recorded() for _ in range(5)]

    async def publish() -> None:
        log = EmbeddedLog(bus)
        await log.publish([OutgoingMessage(key=e.key, value=e.to_bytes()) for e in events])
        await log.close()

    asyncio.run(publish())

    port = free_port()
    env = {
        **os.environ,
        "VRS_ENVIRONMENT": "test",
        "VRS_VAR_DIR": str(tmp_path),
        "VRS_STATS_MAIN_DSN": dsn,
        "VRS_STATS_METRICS_PORT": str(port),
        "VRS_BUS_KIND": "embedded",
        "VRS_BUS_EMBEDDED_PATH": str(bus.embedded_path),
        "VRS_BUS_PARTITIONS": "2",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "consume", "stats"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        applied = lag = None
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            applied = metric_value(text, "vrs_stats_events_applied_total", type="dose.recorded")
            lags = [metric_value(text, "vrs_stats_consumer_lag", consumer="stats", partition=p) for p in "01"]
            lag = None if None in lags else sum(x for x in lags if x is not None)
            if applied == len(events) and lag == 0:
                break
            time.sleep(0.1)
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=30)
    assert applied == len(events) and lag == 0, (applied, lag, output.decode())
    assert worker.returncode == 0, output.decode()
    lines = [json.loads(line) for line in output.decode().splitlines() if line.strip()]
    assert lines and all(e["service"] == "stats-consumer" and "request_id" in e for e in lines), output.decode()
