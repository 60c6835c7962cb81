"""Group commit: what concurrent callers submit while a call is in flight goes together in the next call, and
each caller gets exactly its own answers."""

from __future__ import annotations

import asyncio

import pytest

from shared.coalesce import Coalescer


class Doubler:
    """``run``: each item doubled, after the test lets the call finish (``release``)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_with: Exception | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [2 * i for i in items]


async def test_a_lone_caller_is_served_at_once() -> None:
    run = Doubler()
    run.release.set()
    assert await Coalescer(run).submit([1, 2]) == [2, 4]
    assert run.calls == [[1, 2]]


async def test_callers_arriving_during_a_call_go_together_in_the_next_and_each_gets_its_own_answers() -> None:
    run = Doubler()
    coalescer = Coalescer(run)
    first = asyncio.create_task(coalescer.submit([1]))
    await asyncio.sleep(0)  # the first call is in flight
    later = [asyncio.create_task(coalescer.submit([10 * n, 10 * n + 1])) for n in range(1, 4)]
    await asyncio.sleep(0)
    run.release.set()
    assert await first == [2]
    assert [await t for t in later] == [[20, 22], [40, 42], [60, 62]]
    assert run.calls == [[1], [10, 11, 20, 21, 30, 31]]
    assert (coalescer.calls, coalescer.items) == (2, 7)


@pytest.mark.parametrize(
    ("max_items", "sizes", "calls"),
    [
        (4, [2, 2, 1], [[2, 2], [1]]),  # 2 + 2 fit; the last would make 5
        (4, [2, 1, 1], [[2, 1, 1]]),  # exactly 4 fit
        (4, [1, 5, 1], [[1], [5], [1]]),  # larger than the most a call carries: alone
    ],
)
async def test_a_call_carries_at_most_max_items(max_items: int, sizes: list[int], calls: list[list[int]]) -> None:
    run = Doubler()
    coalescer = Coalescer(run, max_items=max_items)
    in_flight = asyncio.create_task(coalescer.submit([0]))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(coalescer.submit([size] * size)) for size in sizes]
    await asyncio.sleep(0)
    run.release.set()
    assert await in_flight == [0]
    assert [await t for t in tasks] == [[2 * size] * size for size in sizes]
    # After the call in flight, one call per group, each carrying its submissions' items.
    assert [len(call) for call in run.calls[1:]] == [sum(group) for group in calls]


async def test_a_failed_call_fails_every_caller_in_it_and_the_next_call_is_made() -> None:
    run = Doubler()
    coalescer = Coalescer(run)
    first = asyncio.create_task(coalescer.submit([1]))
    await asyncio.sleep(0)
    together = [asyncio.create_task(coalescer.submit([n])) for n in (2, 3)]
    run.fail_with = RuntimeError("the database went away")
    run.release.set()
    for task in [first, *together]:
        with pytest.raises(RuntimeError, match="went away"):
            await task
    run.fail_with = None
    assert await coalescer.submit([4]) == [8]


async def test_a_cancelled_caller_leaves_the_others_served() -> None:
    run = Doubler()
    coalescer = Coalescer(run)
    first = asyncio.create_task(coalescer.submit([1]))
    await asyncio.sleep(0)
    gone = asyncio.create_task(coalescer.submit([2]))
    stays = asyncio.create_task(coalescer.submit([3]))
    await asyncio.sleep(0)
    gone.cancel()
    first.cancel()  # the caller whose submission started the calls: the calls go on in their own task
    run.release.set()
    assert await stays == [6]
    assert gone.cancelled() and first.cancelled()
    assert run.calls == [[1], [3]]


async def test_an_answer_of_the_wrong_length_fails_the_callers() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        await Coalescer(short).submit([1, 2])


def test_a_coalescer_outlives_the_event_loop_it_was_first_used_on() -> None:
    """A loop that ends (each test's) does not strand the next loop's callers."""

    async def double(items: list[int]) -> list[int]:
        return [2 * i for i in items]

    coalescer = Coalescer(double)
    assert asyncio.run(coalescer.submit([1])) == [2]
    assert asyncio.run(coalescer.submit([2])) == [4]
