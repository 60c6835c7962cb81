"""How a VRS runs on one machine: ports, shard databases, wiring and the production-like environment.

Used by the launcher (``vrs run``), the end-to-end tests and the bench, so that all three start the system
the same way. What each service owns (its settings and migration trees) is runtime knowledge and lives in
:mod:`shared.migrations`.
"""

from __future__ import annotations

import json
from typing import Any

from shared.migrations import BY_NAME, SERVICES, migrate_all

__all__ = [
    "BY_NAME",
    "PORTS",
    "SERVICES",
    "SHARDS",
    "TOPICS",
    "WORKERS",
    "WORKERS_ENV",
    "migrate_all",
    "postgres_databases",
    "postgres_env",
    "wiring_env",
]

# Fixed ports of `make run` (the tests and the bench use free ones).
PORTS = {"registry": 8001, "records": 8002, "stats": 8003, "gateway": 8000}
SHARDS = ("s0", "s1")
# The topics and their partitions, as `make run-full` and the tests create them.
TOPICS = {"dose-events": 4, "coupon-events": 4}
# Production's shape: the relays and consumers as processes of their own (``vrs relay …``, ``vrs consume …``),
# started beside the services, whose own copies WORKERS_ENV turns off.
WORKERS = {
    "registry-relay": ("relay", "registry"),
    "records-relay": ("relay", "records"),
    "records-consumer": ("consume", "records"),
    "stats-consumer": ("consume", "stats"),
}
WORKERS_ENV = {
    "VRS_REGISTRY_RUN_RELAY": "false",
    "VRS_RECORDS_RUN_RELAY": "false",
    "VRS_RECORDS_RUN_CONSUMER": "false",
    "VRS_STATS_RUN_CONSUMER": "false",
}


def wiring_env(ports: dict[str, int], host: str = "127.0.0.1") -> dict[str, str]:
    """How the services find each other."""
    url = {name: f"http://{host}:{port}" for name, port in ports.items()}
    return {
        "VRS_REGISTRY_RECORDS_URL": url["records"],
        "VRS_GATEWAY_REGISTRY_URL": url["registry"],
        "VRS_GATEWAY_RECORDS_URL": url["records"],
        "VRS_GATEWAY_STATS_URL": url["stats"],
        # Cards name the gateway's public address as their issuer; verifiers fetch its keys there.
        "VRS_REGISTRY_SHC_ISSUER": f"{url['gateway']}/issuer",
    }


def postgres_databases() -> list[str]:
    names = []
    for spec in SERVICES:
        names.append(f"{spec.name}_main")
        if spec.sharded:
            names += [f"{spec.name}_{shard}" for shard in SHARDS]
    return names


def postgres_env(dsn_for: Any, *, kafka_bootstrap: str) -> dict[str, str]:
    """Production configuration on one PostgreSQL server (a database per shard) and a Kafka broker.

    ``dsn_for(database_name)`` gives the asyncpg URL of a database.
    """
    env = {"VRS_BUS_KIND": "kafka", "VRS_BUS_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    for spec in SERVICES:
        env[f"{spec.env_prefix}MAIN_DSN"] = dsn_for(f"{spec.name}_main")
        if spec.sharded:
            env[f"{spec.env_prefix}SHARD_DSNS"] = json.dumps({s: dsn_for(f"{spec.name}_{s}") for s in SHARDS})
    return env
