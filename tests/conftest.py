"""Harness fixtures: a real PostgreSQL server and a real Kafka broker for the whole test session.

Both run from throwaway directories on free ports and are stopped at the end. When what they need is
missing (PostgreSQL binaries; Java, or the Kafka jars and Maven to fetch them) the tests that use them are
skipped with the reason — except on CI (``CI=true``), where that is a failure: CI must test everything.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.harness import free_port
from devtools.harness.kafka import KafkaError, KafkaServer, fetch_jars, missing_prerequisites
from devtools.harness.postgres import PostgresServer, find_pg_bindir
from tests.factories import run_upgrade, unavailable


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    """The PostgreSQL binaries, or a skip (a failure on CI)."""
    bindir = find_pg_bindir()
    if bindir is None:
        unavailable("PostgreSQL binaries not found (apt-get install postgresql)")
    return bindir


@pytest.fixture(scope="session")
def kafka_lib() -> Path:
    """The Kafka broker's jars (fetched once into .cache/kafka/), or a skip (a failure on CI)."""
    reason = missing_prerequisites()
    if reason is not None:
        unavailable(reason)
    try:
        return fetch_jars()
    except KafkaError as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def server_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the servers of this session keep their data.

    Not under pytest's temporary root when we are root: every pytest session that starts resets that root
    to mode 0700, which would lock the postgres user out of the data directories of a session running
    alongside.
    """
    if os.geteuid() != 0:
        yield tmp_path_factory.mktemp("servers")
        return
    root = Path(tempfile.mkdtemp(prefix="vrs-test-servers-"))
    try:
        yield root
    finally:
        discard_in_background(root)


def discard_in_background(root: Path) -> None:
    """Deletes ``root`` after the session, not in it: a whole run leaves hundreds of databases and topics there,
    and deleting their files took 40–51 s of the session's teardown (its servers are stopped by then)."""
    doomed = root.with_name(root.name + "-discarded")
    root.rename(doomed)
    subprocess.Popen(
        ["nice", "-n", "19", "rm", "-rf", "--", str(doomed)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives pytest, and a ^C of the terminal does not reach it
    )


@pytest.fixture
def server_dir(server_root: Path) -> Path:
    """A fresh directory for a server that a single test starts (and stops) itself."""
    return Path(tempfile.mkdtemp(dir=server_root))


@pytest.fixture(scope="session")
def pg_server(pg_bindir: Path, server_root: Path) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; make a database per test with :func:`make_database`."""
    server = PostgresServer(server_root / "postgres" / "data", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop(discard=True)  # the session's databases go with server_root


@pytest.fixture(scope="session")
def make_database(pg_server: PostgresServer) -> Callable[..., str]:
    """``make_database(prefix="test", tree=None) -> dsn``: a new database with a unique name, empty or at the head
    of the migration tree ``tree`` — a copy of a database that tree was migrated into once this session (a copy
    takes ~0.06 s; migrating took 0.1–0.3 s, some 850 times a run)."""
    counter = itertools.count(1)
    templates: dict[Path, str] = {}

    def make(prefix: str = "test", tree: Path | None = None) -> str:
        template = None
        if tree is not None:
            template = templates.get(tree)
            if template is None:
                template = f"template_{next(counter)}_{uuid.uuid4().hex[:8]}"
                pg_server.create_database(template)
                run_upgrade(pg_server.dsn(template), tree)
                templates[tree] = template
        name = f"{prefix}_{next(counter)}_{uuid.uuid4().hex[:8]}"
        pg_server.create_database(name, template=template)
        return pg_server.dsn(name)

    return make


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path, Path], str]:
    """``migrated_sqlite(path, tree) -> dsn``: a SQLite database at ``path`` at the head of the migration tree
    ``tree``, copied from a file that tree was migrated into once this session."""
    root = tmp_path_factory.mktemp("sqlite-templates")
    templates: dict[Path, Path] = {}

    def make(path: Path, tree: Path) -> str:
        template = templates.get(tree)
        if template is None:
            template = root / f"{len(templates)}.db"
            run_upgrade(f"sqlite+aiosqlite:///{template}", tree)
            templates[tree] = template
        shutil.copyfile(template, path)
        return f"sqlite+aiosqlite:///{path}"

    return make


@pytest.fixture(scope="session")
def kafka_server(kafka_lib: Path, server_root: Path) -> Iterator[KafkaServer]:
    """One Kafka broker for the session; use a topic of your own (``create_topic``) per test."""
    server = KafkaServer(server_root / "kafka" / "data", free_port(), free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()  # its log goes with server_root: no controlled shutdown of every test's topics


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the servers they use, so that ``-m "not kafka"`` and the like work."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"pg_bindir", "pg_server", "make_database"}:
            item.add_marker(pytest.mark.postgres)
        if fixtures & {"kafka_lib", "kafka_server"}:
            item.add_marker(pytest.mark.kafka)
