"""The bench's CPU meter: besides cores used, how many threads waited for a CPU — a machine near its cores'
worth of busy may be exactly full or queueing several threads deep, and only the second explains a long p99."""

import multiprocessing
import os
import time

import pytest

from devtools.bench.core import CpuMeter, grown_since


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_more_busy_processes_than_cores_show_as_threads_waiting_for_a_cpu() -> None:
    cores = os.cpu_count() or 1
    spinners = [multiprocessing.Process(target=_spin, args=(3.0,)) for _ in range(2 * cores)]
    for p in spinners:
        p.start()
    try:
        time.sleep(0.5)  # all of them running
        meter = CpuMeter({"spinners": lambda: [p.pid for p in spinners if p.pid is not None]})
        meter.start()
        time.sleep(1.5)
        meter.stop()
    finally:
        for p in spinners:
            p.join()
    # 2 × cores spinning on cores CPUs: about ``cores`` of them wait at any moment (less what others run).
    assert meter.waiting >= cores / 2
    assert meter.cores["spinners"] >= cores / 2
    assert "threads waiting for a CPU" in meter.line()


def test_an_idle_span_has_hardly_anyone_waiting() -> None:
    meter = CpuMeter({})
    meter.start()
    time.sleep(0.5)
    meter.stop()
    assert meter.waiting < (os.cpu_count() or 1) * 2  # whatever else runs on the machine, not a spinning queue


@pytest.mark.parametrize(
    ("before", "now", "waited"),
    [
        ({"1": 100, "2": 50}, {"1": 130, "2": 55}, 35),  # both alive: what each waited meanwhile
        ({"1": 100, "2": 10_000}, {"1": 130}, 30),  # thread 2 ended: its lifetime's wait does not cancel the span
        ({"1": 100}, {"1": 130, "3": 40}, 70),  # thread 3 started meanwhile: all of its wait is in the span
        ({"1": 100}, {"1": 20}, 20),  # thread id 1 reused by a new thread: all of the new one's wait
        ({}, {}, 0),
    ],
)
def test_the_wait_is_counted_thread_by_thread(before: dict[str, int], now: dict[str, int], waited: int) -> None:
    assert sum(grown_since(before, now).values()) == waited


def _nap(times: int) -> None:
    for _ in range(times):
        time.sleep(0.002)


def test_a_process_that_wakes_often_is_counted_on_a_cpu_as_often() -> None:
    """Each wake-up from a sleep puts the thread on a CPU again: the meter counts them per group."""
    napper = multiprocessing.Process(target=_nap, args=(400,))
    napper.start()
    try:
        time.sleep(0.2)  # started
        meter = CpuMeter({"napper": lambda: [napper.pid] if napper.pid is not None else []})
        meter.start()
        time.sleep(0.5)
        meter.stop()
    finally:
        napper.join()
    assert meter.runs["napper"] >= 100  # about 200 naps of 2 ms in half a second (longer on a busy machine)
    assert "napper" in meter.runs_line(100)
