"""SQLite's switch to WAL while another connection holds the database: waited for, not failed."""

import sqlite3
import threading
from pathlib import Path

import pytest

from shared.db import sqlite_wal


def test_wal_switch_waits_for_a_connection_that_holds_the_database(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("PRAGMA journal_mode=WAL")  # what the embedded log and the engines met before
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    sqlite_wal(other, timeout=10)
    release.join()
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_wal_switch_gives_up_after_its_timeout(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlite_wal(other, timeout=0.2)
    holder.execute("COMMIT")
