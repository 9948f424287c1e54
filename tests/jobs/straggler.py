"""A job with a straggler and a failed attempt, for the timeline tests: one map per input
file (``input="name"``), each sleeping a while so every bar is wide enough to see;
``f3.txt``'s map sleeps far longer (the straggler) and ``f5.txt``'s first attempt fails.
``--arg hold=PATH`` makes the straggler wait until PATH exists instead (a cluster test
looks at the job while it runs, then lets it finish)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from kubemr_async import Job, TaskContext

job = Job("straggler")

#: Seconds each map sleeps, and the straggler's.
MAP_SECONDS = 0.4
STRAGGLER_SECONDS = 2.5
#: The longest a held straggler waits (a test that died never releases it).
HOLD_LIMIT = 600.0


@job.map(input="name")
def nap(name: str, ctx: TaskContext) -> Iterator[tuple[str, int]]:
    hold = ctx.args.get("hold")
    if not name.endswith("f3.txt"):
        time.sleep(MAP_SECONDS)
    elif hold is None:
        time.sleep(STRAGGLER_SECONDS)
    else:
        deadline = time.monotonic() + HOLD_LIMIT
        while not Path(hold).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    if name.endswith("f5.txt") and ctx.attempt == 1:
        raise RuntimeError("the first attempt of f5's map fails")
    yield name.rsplit("/", 1)[-1], 1


job.reduce("sum")
