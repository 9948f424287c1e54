"""A job with a straggler and a failed attempt, for the timeline tests: one map per input
file (``input="name"``), each sleeping a while so every bar is wide enough to see;
``f3.txt``'s map sleeps far longer (the straggler) and ``f5.txt``'s first attempt fails.
``--arg straggle=SECONDS`` lengthens the straggler (a cluster test watches it run)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from kubemr_async import Job, TaskContext

job = Job("straggler")

#: Seconds each map sleeps, and the straggler's.
MAP_SECONDS = 0.4
STRAGGLER_SECONDS = 2.5


@job.map(input="name")
def nap(name: str, ctx: TaskContext) -> Iterator[tuple[str, int]]:
    straggle = float(ctx.args.get("straggle", STRAGGLER_SECONDS))
    time.sleep(straggle if name.endswith("f3.txt") else MAP_SECONDS)
    if name.endswith("f5.txt") and ctx.attempt == 1:
        raise RuntimeError("the first attempt of f5's map fails")
    yield name.rsplit("/", 1)[-1], 1


job.reduce("sum")
