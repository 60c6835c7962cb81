"""Alembic, driven from code: ``upgrade(url, location)`` for one database; ``run_env`` for env.py files.

Each service keeps its migration trees under ``services/<name>/migrations/<tree>/`` (``main`` and, for
sharded services, ``shard``); the same tree is applied to every shard.
"""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from shared.db import BY_AGE

SERVICES_DIR = Path(__file__).resolve().parents[1] / "services"


@dataclass(frozen=True)
class ServiceSpec:
    """One service as the operator sees it: its settings (env prefix) and the databases it owns."""

    name: str
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


# In the order they start: the gateway last, it is ready only when what it fronts is.
SERVICES = (
    ServiceSpec("registry", "RegistrySettings", sharded=True),
    ServiceSpec("records", "RecordsSettings", sharded=True),
    ServiceSpec("stats", "StatsSettings", sharded=False),
    ServiceSpec("gateway", "GatewaySettings", sharded=False),
)
BY_NAME = {spec.name: spec for spec in SERVICES}


def migrate_all() -> None:
    """Apply every service's migrations to every database the current environment configures."""
    for spec in SERVICES:
        for url, tree in spec.migration_targets():
            upgrade(url, tree)


def upgrade(url: str, location: Path, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision``. Synchronous: call it outside a running event loop."""
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["url"] = url
    command.upgrade(cfg, revision)


def downgrade(url: str, location: Path, revision: str) -> None:
    """Take the database at ``url`` back to ``revision``. Synchronous, as :func:`upgrade`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["url"] = url
    command.downgrade(cfg, revision)


def set_statistics(op: Any, columns: dict[str, tuple[str, ...]], target: int) -> None:
    """For a migration: these columns' statistics target (PostgreSQL): 0 builds none at ``ANALYZE``, -1 the server's
    default. For columns no statement filters, joins or orders by; building their statistics is work for nobody."""
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, names in columns.items():
        op.execute(f"ALTER TABLE {table} " + ", ".join(f"ALTER COLUMN {c} SET STATISTICS {target}" for c in names))


def create_index_by_age(op: Any, name: str, table: str, column: str) -> None:
    """For a migration: the index by age the models declare (:data:`shared.db.BY_AGE`: BRIN on PostgreSQL,
    summarised as its ranges fill), built ``CONCURRENTLY`` there — outside the migration's transaction, one scan of
    the table while its writers go on — so that adding it to a table that has grown for years blocks nobody."""
    with op.get_context().autocommit_block():
        op.create_index(name, table, [column], postgresql_concurrently=True, **BY_AGE)


def run_env(metadata: MetaData) -> None:
    """The body of every migration tree's ``env.py``."""
    url = context.config.attributes.get("url") or context.get_x_argument(as_dictionary=True)["url"]

    def do_run(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    async def run() -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        async with engine.connect() as connection:
            await connection.run_sync(do_run)
            await connection.commit()
        await engine.dispose()

    asyncio.run(run())


def new_revision(url: str, location: Path, message: str, rev_id: str) -> None:
    """Autogenerate a revision against an up-to-date database (developer tool: ``vrs makemigration``)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    cfg.attributes["url"] = url
    command.revision(cfg, message=message, autogenerate=True, rev_id=rev_id)
