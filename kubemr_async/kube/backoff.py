"""One retry delay policy for every loop that talks to the API server."""

from __future__ import annotations

import random

import anyio


class Backoff:
    """Exponential delays with jitter: ``initial``, doubling, capped at ``maximum``.

    The first :meth:`wait` after a :meth:`reset` does not sleep: a watch that ended
    cleanly reconnects at once, and only repeated trouble slows the loop down. The jitter
    (a random fraction of each delay) keeps many workers that lost the same server from
    coming back in lockstep.
    """

    def __init__(self, initial: float = 0.2, maximum: float = 5.0, factor: float = 2.0,
                 jitter: float = 0.2) -> None:
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self._next = 0.0

    @property
    def delay(self) -> float:
        """What the next :meth:`wait` sleeps (before jitter)."""
        return self._next

    def reset(self) -> None:
        self._next = 0.0

    async def wait(self) -> None:
        delay = self._next
        self._next = min(self.maximum, max(self.initial, self._next * self.factor))
        if delay:
            # Imported here, on the first retry: prometheus_client and the endpoint's HTTP
            # server cost every CLI command ~0.1 s of start-up, and only a retry counts.
            from .. import metrics

            metrics.API_RETRIES.inc()
            await anyio.sleep(delay * (1 + self.jitter * random.random()))
