"""A word count whose data can fail it or hold it, for `kubemr retry` and `results --cat`.

* A map whose input contains the word ``poison`` raises, so the job fails because of its
  data (with maxAttempts 1, at once). With ``args["wait_for"] = N`` it first waits until N
  other maps have started (they are in the attempt log) and then ``args["settle"]``
  seconds, so a test knows which maps had committed when the job failed.
* The reduce named by ``args["hold"]`` (e.g. ``reduce-00001``) waits until the file
  ``args["release"]`` exists, so a test can read results streaming out of a running job.

Every map attempt is logged like tests.jobs.attempts (``args["log"]``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from kubemr_async import Job, TaskContext

from .attempts import record

job = Job("poison")


def _started_maps(ctx: TaskContext) -> int:
    path = ctx.args.get("log", "")
    if not os.path.exists(path):
        return 0
    with open(path) as log:
        tasks = {line.split()[0] for line in log if line.startswith("map-")}
    return len(tasks - {ctx.task})


def _released(ctx: TaskContext) -> bool:
    return ctx.task != ctx.args.get("hold") or os.path.exists(ctx.args["release"])


async def _until(condition: Callable[[], bool]) -> None:
    """Poll: the signals are files written by the test, which pods share with it."""
    while True:
        if condition():
            return
        await asyncio.sleep(0.1)


@job.map(input="text")
async def words(text: str, ctx: TaskContext) -> None:
    record(ctx)
    if "poison" in text.split():
        await _until(lambda: _started_maps(ctx) >= int(ctx.args.get("wait_for", "0")))
        await asyncio.sleep(float(ctx.args.get("settle", "0")))
        raise ValueError(f"poisoned input {ctx.input}")
    ctx.emit_batch(text.split(), 1)


@job.reduce
async def total(key: str, values: list[int], ctx: TaskContext) -> int:
    await _until(lambda: _released(ctx))
    return sum(values)
