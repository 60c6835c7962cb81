"""Alembic, driven from code: ``upgrade(url, location)`` for one database; ``run_env`` for env.py files.

Each service keeps its migration trees under ``services/<name>/migrations/<tree>/`` (``main`` and, for
sharded services, ``shard``); the same tree is applied to every shard.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine


def upgrade(url: str, location: Path, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision``. Synchronous: call it outside a running event loop."""
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["url"] = url
    command.upgrade(cfg, revision)


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
