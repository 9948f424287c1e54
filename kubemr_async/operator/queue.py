"""A coalescing work queue of job keys and the reconcile workers that drain it.

The controller-runtime model (client-go's ``workqueue``), on anyio:

* a key is pending at most once: a burst of watch events for one job is one reconcile;
* a key being reconciled is not handed out again until :meth:`WorkQueue.done`; added
  meanwhile, it is marked *dirty* and handed out once more after, so the change that
  arrived during the reconcile is seen by a reconcile that starts after it;
* :meth:`WorkQueue.add_after` adds a key later (a TTL that expires, a retry), and
  :meth:`WorkQueue.add_rate_limited` retries a failed key with a delay that doubles with
  each failure in a row, until :meth:`WorkQueue.forget` (a success) resets it;
* a key that is done, not dirty and not waiting is forgotten entirely: nothing grows
  with the number of jobs ever seen.

:func:`run_workers` runs a fixed number of workers in one task group, so a job's
reconcile never runs twice at once and the operator's concurrency has a bound.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import anyio

log = logging.getLogger("kubemr.operator.queue")

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Keys to reconcile; see the module docstring for the rules.

    ``retry_initial`` and ``retry_maximum`` bound :meth:`add_rate_limited`'s delays.
    """

    def __init__(self, retry_initial: float = 0.5, retry_maximum: float = 30.0) -> None:
        self.retry_initial, self.retry_maximum = retry_initial, retry_maximum
        self._queue: deque[K] = deque()  # ready, in order; each key at most once
        self._dirty: set[K] = set()  # to be reconciled (queued, or waiting for done())
        self._processing: set[K] = set()  # handed out by get(), not done() yet
        self._waiting: dict[K, float] = {}  # key -> when add_after() adds it
        self._timers: list[tuple[float, int, K]] = []  # heap over _waiting (stale entries ok)
        self._order = itertools.count()
        self._failures: dict[K, int] = {}  # failed reconciles in a row, for the retry delay
        self._wakeup: anyio.Event | None = None

    def __len__(self) -> int:
        """Keys ready to be handed out."""
        return len(self._queue)

    def __contains__(self, key: object) -> bool:
        """Whether the queue holds anything about ``key`` (pending, running or waiting)."""
        return (key in self._dirty or key in self._processing or key in self._waiting
                or key in self._failures)

    @property
    def retained(self) -> int:
        """How many keys the queue remembers in any way (none once all are done)."""
        return len(self._dirty | self._processing | self._waiting.keys()
                   | self._failures.keys())

    def add(self, key: K) -> None:
        """Reconcile ``key`` soon: once, however often it is added before a worker takes it."""
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._notify()

    def add_after(self, key: K, seconds: float) -> None:
        """Add ``key`` in ``seconds``; an earlier wake-up already planned for it stands."""
        if seconds <= 0:
            self.add(key)
            return
        due = anyio.current_time() + seconds
        if self._waiting.get(key, math.inf) <= due:
            return
        self._waiting[key] = due
        heapq.heappush(self._timers, (due, next(self._order), key))
        self._notify()

    def add_rate_limited(self, key: K) -> None:
        """Retry ``key`` after a failure: ``retry_initial`` seconds, doubling each time it
        fails again, up to ``retry_maximum``."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        self.add_after(key, min(self.retry_maximum, self.retry_initial * 2 ** failures))

    def forget(self, key: K) -> None:
        """``key`` succeeded: its next failure starts the retry delays afresh."""
        self._failures.pop(key, None)

    def done(self, key: K) -> None:
        """A worker finished ``key``; if it was added meanwhile, it is ready again."""
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.append(key)
            self._notify()

    async def get(self) -> K:
        """The next ready key, waiting for one; the caller must call :meth:`done` with it."""
        while True:
            self._promote_due()
            if self._queue:
                key = self._queue.popleft()
                self._processing.add(key)
                self._dirty.discard(key)
                return key
            wakeup = self._wakeup = self._wakeup or anyio.Event()
            delay = self._timers[0][0] - anyio.current_time() if self._timers else math.inf
            with anyio.move_on_after(delay):
                await wakeup.wait()

    def _promote_due(self) -> None:
        now = anyio.current_time()
        while self._timers and self._timers[0][0] <= now:
            due, _, key = heapq.heappop(self._timers)
            if self._waiting.get(key) == due:  # not superseded by an earlier add_after
                del self._waiting[key]
                self.add(key)

    def _notify(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None


async def run_workers(queue: WorkQueue[K], reconcile: Callable[[K], Awaitable[None]],
                      workers: int) -> None:
    """Run ``workers`` workers that take keys from ``queue`` and ``reconcile`` them, forever.

    A reconcile that raises is retried with :meth:`WorkQueue.add_rate_limited` (reporting
    the error is ``reconcile``'s business); one that returns resets the key's retry delay.
    Only a BaseException (a cancellation) ends a worker.
    """

    async def worker() -> None:
        while True:
            key = await queue.get()
            try:
                await reconcile(key)
            except Exception:
                log.debug("reconcile of %s failed; retrying later", key)
                queue.add_rate_limited(key)
            else:
                queue.forget(key)
            finally:
                queue.done(key)

    async with anyio.create_task_group() as group:
        for _ in range(workers):
            group.start_soon(worker)
