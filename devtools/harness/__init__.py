"""Real PostgreSQL and Apache Kafka servers for the integration tests and local production-mode runs.

- :mod:`devtools.harness.postgres` — a PostgreSQL cluster in a directory (the Debian binaries).
- :mod:`devtools.harness.kafka` — a single-node KRaft Kafka broker (jars fetched from Maven Central).

Both keep all their state in a data directory, survive being killed, and take over (or cleanly replace) a
server left running on the same directory by an earlier, killed run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (for tests; racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """Whether a process exists (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state follows the parenthesised command name, which may itself contain spaces or ')'.
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for_exit(pids: list[int], timeout: float) -> bool:
    """Wait until none of ``pids`` is alive; ``False`` if some still are after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def kill_quietly(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def scratch_directory(prefix: str, *, keep: bool, say: Callable[[str], None] = print) -> Iterator[Path]:
    """A temporary directory for a bench or soak run, removed afterwards unless ``keep`` — or the run failed
    (other than by Ctrl-C), when its logs say what went wrong."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    keep_it = keep
    try:
        yield tmp
    except KeyboardInterrupt:
        raise
    except BaseException:
        keep_it = True
        raise
    finally:
        if keep_it:
            say(f"logs and data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "PROJECT_ROOT",
    "free_port",
    "kill_quietly",
    "pid_alive",
    "scratch_directory",
    "tail",
    "wait_for_exit",
]
