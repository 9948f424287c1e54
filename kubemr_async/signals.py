"""Stopping a process cleanly on SIGINT or SIGTERM: the signal cancels the main coroutine, so
every ``finally`` runs (workers handed back, a leader's Lease released) before the exit.
Python's default SIGTERM ends the process on the spot, which is what Kubernetes sends
first when it stops a pod.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

from .errors import Interrupted

T = TypeVar("T")


async def until_signalled(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; SIGINT/SIGTERM cancel it (so every finally cleans up), then Interrupted."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if not received:  # a second Ctrl-C must not interrupt the cleanup
            task.cancel()
        received.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await coro
    except asyncio.CancelledError:
        if not received:
            raise
        task.uncancel()
        raise Interrupted(received[0]) from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
