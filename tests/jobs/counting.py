"""A word count that keeps user counters and fails chosen tasks' first attempts.

``--arg fail=map-00001,reduce-00000`` (task names, or ``all``) makes those tasks raise on
attempt 1 *after* incrementing their counters, so the job's totals are exact only if a
failed attempt's increments never count; ``--arg log=PATH`` appends each attempt that
raises there (tests.jobs.attempts.record); ``--arg gate=PATH`` holds every reduce attempt
that is not chosen to fail until PATH exists, so a test can look at a job stopped half-way
on purpose (the metrics tests scrape it there). Counters (group ``text``):

* ``newlines``: ``\\n`` characters read; ``words``: ``str.split()`` words (one call per line)
* ``distinct``: keys reduced; ``seen once``: keys whose count is 1
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from kubemr_async import Job, TaskContext
from tests.jobs.attempts import record

job = Job("counting")


def chosen_to_fail(ctx: TaskContext) -> bool:
    chosen = ctx.args.get("fail", "")
    return ctx.attempt == 1 and (chosen == "all" or ctx.task in chosen.split(","))


def fail_first_attempt(ctx: TaskContext) -> None:
    if chosen_to_fail(ctx):
        record(ctx)
        raise RuntimeError(f"{ctx.task} fails its first attempt on purpose")


@job.reduce_setup
def wait_for_gate(ctx: TaskContext) -> None:
    """Plain and blocking on purpose: it runs on the worker's user-code thread, as a long
    computation would, while the leases keep being renewed."""
    gate = ctx.args.get("gate")
    if not gate or chosen_to_fail(ctx):
        return
    deadline = time.monotonic() + 300
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} never appeared")
        time.sleep(0.05)


@job.map
def words(text: str, ctx: TaskContext) -> Iterator[tuple[str, int]]:
    ctx.counter("text", "newlines", text.count("\n"))
    for line in text.split("\n"):
        found = line.split()
        ctx.counter("text", "words", len(found))
        for word in found:
            yield word, 1
    fail_first_attempt(ctx)


@job.reduce
async def total(key: str, values: list[int], ctx: TaskContext) -> int:
    count = sum(values)
    ctx.counter("text", "distinct")
    if count == 1:
        ctx.counter("text", "seen once")
    fail_first_attempt(ctx)
    return count
