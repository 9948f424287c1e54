"""Merging concurrent producers into one async iterator, with nothing left running.

The store's watch (a job stream and a task stream) and the CLI's pod logs (one stream per
pod) both hand their consumer one ordered-per-producer sequence of items from several
producers that run at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
from anyio.abc import ObjectSendStream

from .errors import first_error

T = TypeVar("T")

#: A producer sends its items into the stream it is given and returns when it is done.
Producer = Callable[[ObjectSendStream[T]], Awaitable[None]]


async def merge(producers: Sequence[Producer[T]], *, first_ends: bool = False,
                buffer: int = 1024, name: str = "kubemr-merge") -> AsyncGenerator[T, None]:
    """The items the ``producers`` send, as they arrive, until every producer has returned
    (with ``first_ends``: until the first one has, which stops the others).

    The producers run in one anyio task group: a failing producer cancels its siblings,
    and its error (not an ExceptionGroup) is raised here after the items sent before it.
    At most ``buffer`` items wait for the consumer; then producers wait too.

    The task group runs in one task that this generator owns and always cancels and awaits
    on its way out, however the consumer stops (``break`` under ``contextlib.aclosing``,
    cancellation, an error). The group is not held across our ``yield``: consumers may
    drive this generator from more than one task (``asyncio.wait_for(anext(...))`` wraps
    each step in a task of its own), and a cancel scope must be left in the task that
    entered it.
    """
    send, receive = anyio.create_memory_object_stream[T](buffer)

    async def run() -> None:
        async with send:
            with first_error():
                async with anyio.create_task_group() as group:
                    for producer in producers:
                        group.start_soon(produce, producer, group.cancel_scope)

    async def produce(producer: Producer[T], scope: anyio.CancelScope) -> None:
        await producer(send)
        if first_ends:
            scope.cancel()

    runner = asyncio.create_task(run(), name=name)
    try:
        async with receive:
            async for item in receive:
                yield item
        await runner  # every producer returned, or one failed: raise its error
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
