"""What a running VRS is made of: the services, their ports, settings and migration trees.

Used by the launcher (``vrs run``), ``vrs migrate`` and the end-to-end tests, so that all three start the
system the same way.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.migrations import upgrade

SERVICES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    port: int
    settings_class: str
    sharded: bool

    @property
    def env_prefix(self) -> str:
        return f"VRS_{self.name.upper()}_"

    def settings(self) -> Any:
        module = importlib.import_module(f"services.{self.name}.settings")
        return getattr(module, self.settings_class)()

    def migration_targets(self) -> list[tuple[str, Path]]:
        """(database URL, migration tree) for every database this service owns, as configured now."""
        settings = self.settings()
        trees = SERVICES_DIR / self.name / "migrations"
        targets = [(settings.main_dsn, trees / "main")]
        if self.sharded:
            targets += [(dsn, trees / "shard") for dsn in settings.shard_dsns.values()]
        return targets


SERVICES = (
    ServiceSpec("registry", 8001, "RegistrySettings", sharded=True),
    ServiceSpec("records", 8002, "RecordsSettings", sharded=True),
    ServiceSpec("stats", 8003, "StatsSettings", sharded=False),
    ServiceSpec("gateway", 8000, "GatewaySettings", sharded=False),
)
BY_NAME = {spec.name: spec for spec in SERVICES}
SHARDS = ("s0", "s1")


def migrate_all() -> None:
    """Apply every service's migrations to every database the current environment configures."""
    for spec in SERVICES:
        for url, tree in spec.migration_targets():
            upgrade(url, tree)


def wiring_env(ports: dict[str, int], host: str = "127.0.0.1") -> dict[str, str]:
    """How the services find each other."""
    url = {name: f"http://{host}:{port}" for name, port in ports.items()}
    return {
        "VRS_REGISTRY_RECORDS_URL": url["records"],
        "VRS_RECORDS_REGISTRY_URL": url["registry"],
        "VRS_GATEWAY_REGISTRY_URL": url["registry"],
        "VRS_GATEWAY_RECORDS_URL": url["records"],
        "VRS_GATEWAY_STATS_URL": url["stats"],
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
