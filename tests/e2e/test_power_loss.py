"""Every process killed at once (SIGKILL), then started again on the same data: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from devtools.harness import free_port
from devtools.harness.kafka import KafkaServer
from devtools.harness.postgres import PostgresServer
from devtools.launcher import Stack
from devtools.stack import SERVICES, TOPICS, postgres_databases, postgres_env, wiring_env
from devtools.tokens import bearer_headers
from shared.auth import Role

CLINIC = bearer_headers(Role.INSTITUTION, institution="1312345678")
DAY = "2021-07-01"


def start_stack(env: dict[str, str], var: Path, ports: dict[str, int]) -> Stack:
    env = {**env, **wiring_env(ports), "VRS_VAR_DIR": str(var), "VRS_ENVIRONMENT": "test"}
    subprocess.run([sys.executable, "-m", "shared.cli", "migrate"], env=env, check=True)
    stack = Stack(env=env, ports=ports, log_dir=var / "log")
    stack.start(timeout=60)
    return stack


def kill_all(stack: Stack) -> None:
    for name in list(stack.processes):
        stack.stop_service(name, sig=signal.SIGKILL)


async def post_doses(stack: Stack, n: int) -> list[tuple[str, dict[str, object], dict[str, object]]]:
    sent = []
    async with httpx.AsyncClient(base_url=stack.url(), timeout=30) as gw:
        for i in range(n):
            body = {
                "coupon": f"11131016{uuid.uuid4().int % 10**9:09d}{i % 10}",
                "dose_number": 1,
                "vaccinated_on": DAY,
                "vaccine": "pfizer",
                "lot_number": "FA1234",
            }
            key = str(uuid.uuid4())
            r = await gw.post("/api/v1/doses", json=body, headers={**CLINIC, "Idempotency-Key": key})
            assert r.status_code == 201, r.text
            sent.append((key, body, r.json()))
    return sent


async def count_on_day(stack: Stack) -> int:
    async with httpx.AsyncClient(base_url=stack.url(), timeout=30) as gw:
        r = await gw.get("/api/v1/stats/doses", params={"group_by": "date", "from": DAY, "to": DAY})
        assert r.status_code == 200, r.text
        return sum(row["count"] for row in r.json()["rows"])


async def settle(stack: Stack, expected: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (got := await count_on_day(stack)) != expected:
        assert time.monotonic() < deadline, f"stats show {got}, expected {expected}"
        await asyncio.sleep(0.1)


async def survive(stack: Stack, restart: Callable[[], Stack]) -> None:
    sent = await post_doses(stack, 20)
    # No waiting for stats: some events are still in the outbox or the log when the power goes.
    kill_all(stack)
    stack = restart()
    try:
        await settle(stack, 20)
        # A tablet retrying after the outage gets the answers it got before, and no dose is added.
        async with httpx.AsyncClient(base_url=stack.url(), timeout=30) as gw:
            for key, body, answer in sent[:5]:
                r = await gw.post("/api/v1/doses", json=body, headers={**CLINIC, "Idempotency-Key": key})
                assert r.status_code == 201 and r.json() == answer
        await asyncio.sleep(1.0)
        assert await count_on_day(stack) == 20
    finally:
        stack.stop()


async def test_embedded_survives_sigkill(tmp_path: Path) -> None:
    ports = {spec.name: free_port() for spec in SERVICES}
    env = {**os.environ, "VRS_BUS_KIND": "embedded"}
    stack = start_stack(env, tmp_path, ports)
    await survive(stack, lambda: start_stack(env, tmp_path, ports))


@pytest.mark.usefixtures("pg_bindir", "kafka_lib")
async def test_postgres_kafka_survive_sigkill_of_everything(server_dir: Path, tmp_path: Path) -> None:
    pg = PostgresServer(server_dir / "pg", free_port())
    kafka = KafkaServer(server_dir / "kafka", free_port(), free_port())
    pg.start()
    kafka.start()
    try:
        for name in postgres_databases():
            pg.create_database(name)
        for topic, partitions in TOPICS.items():
            kafka.create_topic(topic, partitions)
        env = {**os.environ, **postgres_env(pg.dsn, kafka_bootstrap=kafka.bootstrap_servers)}
        ports = {spec.name: free_port() for spec in SERVICES}
        stack = start_stack(env, tmp_path, ports)

        def power_back() -> Stack:
            # Fresh harness objects, as a new `make run-full` would make, on the same data directories.
            pg2 = PostgresServer(server_dir / "pg", pg.port)
            kafka2 = KafkaServer(server_dir / "kafka", kafka.port, kafka.controller_port)
            pg2.start()
            kafka2.start()
            return start_stack(env, tmp_path, ports)

        def kill_servers_too() -> Stack:
            pg.kill()
            kafka.kill()
            return power_back()

        await survive(stack, kill_servers_too)
    finally:
        kafka.stop()
        pg.stop()
