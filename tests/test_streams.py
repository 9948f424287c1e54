"""streams.merge: concurrent producers as one iterator, with nothing left running."""

from __future__ import annotations

import asyncio
import contextlib

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ObjectSendStream

from kubemr_async.streams import Producer, merge

pytestmark = pytest.mark.anyio


def counting(name: str, count: int, done: list[str]) -> Producer[str]:
    async def produce(send: ObjectSendStream[str]) -> None:
        try:
            for n in range(count):
                await send.send(f"{name}{n}")
                await anyio.lowlevel.checkpoint()
        finally:
            done.append(name)

    return produce


def forever(name: str, stopped: list[str]) -> Producer[str]:
    async def produce(send: ObjectSendStream[str]) -> None:
        try:
            await send.send(name)
            await anyio.sleep_forever()
        finally:
            stopped.append(name)

    return produce


async def test_items_of_every_producer_in_each_producers_order() -> None:
    done: list[str] = []
    items = [item async for item in merge([counting("a", 5, done), counting("b", 3, done)])]
    assert [i for i in items if i[0] == "a"] == [f"a{n}" for n in range(5)]
    assert [i for i in items if i[0] == "b"] == [f"b{n}" for n in range(3)]
    assert sorted(done) == ["a", "b"]


async def test_first_ends_stops_the_others() -> None:
    stopped: list[str] = []
    items = [item async for item in merge([counting("a", 2, stopped), forever("f", stopped)],
                                          first_ends=True)]
    assert "a0" in items and "a1" in items
    assert sorted(stopped) == ["a", "f"]


async def test_a_failing_producer_cancels_its_siblings_and_its_error_is_raised() -> None:
    stopped: list[str] = []

    async def failing(send: ObjectSendStream[str]) -> None:
        await send.send("x")
        await anyio.sleep(0.01)
        raise LookupError("boom")

    seen: list[str] = []
    with pytest.raises(LookupError, match="boom"):  # the error itself, not a group
        async for item in merge([failing, forever("f", stopped)]):
            seen.append(item)
    assert "x" in seen and stopped == ["f"]


async def test_nothing_runs_after_the_consumer_stops() -> None:
    stopped: list[str] = []
    events = merge([forever("f", stopped), forever("g", stopped)])
    async with contextlib.aclosing(events):
        async for _ in events:
            break
    assert sorted(stopped) == ["f", "g"]


async def test_steps_may_run_in_different_tasks() -> None:
    """asyncio.wait_for(anext(...)) runs each step in a task of its own (Python 3.11), and
    its timeout cancels the step: the merge must end cleanly, not trip on a cancel scope."""
    stopped: list[str] = []
    events = merge([forever("f", stopped)])
    assert await asyncio.wait_for(anext(events), 5) == "f"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(events), 0.05)
    with pytest.raises(StopAsyncIteration):
        await anext(events)
    assert stopped == ["f"]
