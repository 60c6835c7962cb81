"""py-spy beside a bench phase: one sampling profile per service process, and its top lines.

Speed work starts from a profile: ``Profiles(dir, {"records": pid, ...})`` records each process (``py-spy
record --format raw --gil``: one line per distinct stack and its sample count) from :meth:`Profiles.start`
to :meth:`Profiles.stop`. ``--gil`` samples only the thread holding the GIL: without it, kafka-python's
threads, idle in ``select`` at about 0.02 cores each, took a quarter of records' samples
(docs/performance.md). :func:`top_lines` turns a file into the functions that held the CPU themselves (the
stack's innermost frame, "self") and those on the stack the longest (inclusive).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    """The py-spy beside this interpreter (the venv's dev extra), else one on the PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiles:
    def __init__(self, directory: Path, pids: dict[str, int], *, rate: int = 67) -> None:
        self.directory = directory
        self.pids = pids
        self.rate = rate
        self._running: dict[str, subprocess.Popen[bytes]] = {}

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.txt"

    def start(self) -> None:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed (pip install -e '.[dev]')")
        self.directory.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            log = (self.directory / f"{name}.log").open("wb")
            self._running[name] = subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw", "--gil",
                 "--nonblocking", "--output", str(self.path(name))],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self) -> None:
        for process in self._running.values():
            process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for process in self._running.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._running.clear()

    def report(self, lines: int = 12) -> str:
        out = []
        for name in self.pids:
            path = self.path(name)
            if not path.exists():
                out.append(f"  {name}: no profile ({path.with_suffix('.log')})")
                continue
            out.append(f"  {name} ({path}):")
            out += [f"    {line}" for line in top_lines(path, lines)]
        return "\n".join(out)


# Where the project's own code is: the inclusive list names only its functions (the event loop, uvicorn and
# threads' bootstraps are on every stack and say nothing).
OURS = ("(services/", "(shared/")


def _frame(frame: str) -> str:
    """py-spy names frames ``function (package/module.py:line)``; absolute paths are cut to the file."""
    name, _, where = frame.partition(" (/")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else frame


def top_lines(path: Path, lines: int = 12) -> list[str]:
    """The functions holding the CPU themselves (self %) and the longest on the stack (inclusive %)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]  # labels, if any
        if not frames:
            continue
        total += n
        own[_frame(frames[-1])] += n
        for frame in {_frame(f) for f in frames if any(part in f for part in OURS)}:
            inclusive[frame] += n
    if not total:
        return ["(no samples)"]
    out = [f"{total} samples; self:"]
    out += [f"{n / total:6.1%}  {frame}" for frame, n in own.most_common(lines)]
    out.append("inclusive (the project's own functions):")
    out += [f"{n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(lines)]
    return out
