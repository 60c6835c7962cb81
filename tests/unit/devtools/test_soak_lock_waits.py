"""``make soak`` reports the lock waits PostgreSQL logged (``log_lock_waits``), longest first, with what waited."""

from __future__ import annotations

from pathlib import Path

from devtools.soak import _waits_summary, lock_waits

LOG = """\
2026-11-26 11:07:29.240 UTC [32477] LOG:  process 32477 still waiting for ShareLock on transaction 74237 after 1000.1 ms
2026-11-26 11:07:29.240 UTC [32477] DETAIL:  Process holding the lock: 1994. Wait queue: 32477.
2026-11-26 11:07:29.240 UTC [32477] CONTEXT:  while locking tuple (1523,4) in relation "doses"
2026-11-26 11:07:39.826 UTC [32477] LOG:  process 32477 acquired ShareLock on transaction 74237 after 11585.715 ms
2026-11-26 11:07:39.826 UTC [32477] CONTEXT:  while locking tuple (1523,4) in relation "doses"
2026-11-26 11:07:39.826 UTC [32477] STATEMENT:  SELECT 1
2026-11-26 11:08:01.000 UTC [40001] LOG:  process 40001 acquired ExclusiveLock on advisory lock [1,7] after 1250.5 ms
"""


def test_the_longest_wait_comes_first_with_the_relation_it_waited_on(tmp_path: Path) -> None:
    (tmp_path / "postgres.log").write_text(LOG)
    (tmp_path / "kafka.log").write_text("process 1 acquired ShareLock on transaction 1 after 99999 ms\n")  # not PG's
    waits = lock_waits(tmp_path)
    assert [round(seconds, 1) for seconds, _ in waits] == [11.6, 1.3]
    assert 'relation "doses"' in waits[0][1] and "backend 32477" in waits[0][1]
    assert _waits_summary(waits).startswith("2, the longest 11.6 s (ShareLock on transaction 74237")


def test_no_wait_logged_reads_none(tmp_path: Path) -> None:
    (tmp_path / "postgres.log").write_text("2026-11-26 11:00:00.000 UTC [1] LOG:  database system is ready\n")
    assert _waits_summary(lock_waits(tmp_path)) == "none"
