"""Before each records phase the bench writes what the earlier phases left dirty in the page cache, so that the
kernel's own write-back of it (all at once, ~30 s after it was dirtied) does not land in the middle of the phase;
the report says how much that was."""

import asyncio
import os
from pathlib import Path

from devtools.bench.core import dirty_bytes, write_back
from devtools.bench.records import Report, parse_args, render

SIZE = 64 * 1024 * 1024


def test_what_a_process_left_dirty_is_counted_and_written() -> None:
    path = Path("bench-dirty.bin")
    # From a clean page cache: what other processes dirtied earlier could otherwise be written back by the kernel
    # while this test writes, and the machine's count would grow by less than this test's 64 MB (seen in CI).
    os.sync()
    try:
        with path.open("wb") as f:  # the working directory: on disk, unlike a tmpfs /tmp
            for _ in range(SIZE // (1024 * 1024)):
                f.write(os.urandom(1024 * 1024))
        assert dirty_bytes() >= SIZE // 2
        written, seconds = asyncio.run(write_back())
        assert written >= SIZE // 2 and seconds >= 0
        assert dirty_bytes() < SIZE // 2
    finally:
        path.unlink(missing_ok=True)


def test_the_report_says_what_was_written_before_each_phase() -> None:
    report = Report(written_back=[(24_000_000, 0.04), (243_000_000, 0.21)])
    lines = render(report, parse_args([])).splitlines()
    assert any("wrote back" in line and "24 MB in 0.0 s, 243 MB in 0.2 s" in line for line in lines)


def test_no_write_back_is_a_choice() -> None:
    assert parse_args([]).no_write_back is False
    assert parse_args(["--no-write-back"]).no_write_back is True
