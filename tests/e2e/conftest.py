"""The whole system as processes — the way `make run` and `make run-full` start it — on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.harness import free_port
from devtools.launcher import Stack
from devtools.stack import SERVICES, postgres_databases, postgres_env, wiring_env


def _start(env: dict[str, str], log_dir: Path) -> Stack:
    ports = {spec.name: free_port() for spec in SERVICES}
    env = {**env, **wiring_env(ports), "VRS_ENVIRONMENT": "test"}
    subprocess.run([sys.executable, "-m", "shared.cli", "migrate"], env=env, check=True)
    stack = Stack(env=env, ports=ports, log_dir=log_dir)
    try:
        stack.start(timeout=60)
    except BaseException:
        stack.stop()
        for log in sorted(log_dir.glob("*.log")):
            sys.stderr.write(f"--- {log.name}\n{log.read_text()[-3000:]}\n")
        raise
    return stack


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    var = tmp_path_factory.mktemp("embedded-var")
    stack = _start({**os.environ, "VRS_VAR_DIR": str(var), "VRS_BUS_KIND": "embedded"}, var / "log")
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def postgres_kafka_stack(
    tmp_path_factory: pytest.TempPathFactory, pg_server: Any, kafka_server: Any
) -> Iterator[Stack]:
    var = tmp_path_factory.mktemp("full-var")
    prefix = f"e2e{os.getpid()}_"
    for name in postgres_databases():
        pg_server.create_database(prefix + name)
    topics = {"VRS_BUS_TOPIC": f"dose-events-{os.getpid()}", "VRS_BUS_COUPON_TOPIC": f"coupon-events-{os.getpid()}"}
    for topic in topics.values():
        kafka_server.create_topic(topic, 4)
    env = {
        **os.environ,
        "VRS_VAR_DIR": str(var),
        **postgres_env(lambda name: pg_server.dsn(prefix + name), kafka_bootstrap=kafka_server.bootstrap_servers),
        **topics,
    }
    stack = _start(env, var / "log")
    yield stack
    stack.stop()


@pytest.fixture(scope="session", params=["embedded", "postgres_kafka"])
def stack(request: pytest.FixtureRequest) -> Stack:
    """Every end-to-end test runs on both the embedded default and PostgreSQL (2 shards) + Kafka."""
    fixture = "embedded_stack" if request.param == "embedded" else "postgres_kafka_stack"
    result: Stack = request.getfixturevalue(fixture)
    return result
