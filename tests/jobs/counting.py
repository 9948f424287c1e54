"""A word count that keeps user counters and fails chosen tasks' first attempts.

``--arg fail=map-00001,reduce-00000`` (task names, or ``all``) makes those tasks raise on
attempt 1 *after* incrementing their counters, so the job's totals are exact only if a
failed attempt's increments never count; ``--arg log=PATH`` appends each attempt that
raises there (tests.jobs.attempts.record). Counters (group ``text``):

* ``newlines``: ``\\n`` characters read; ``words``: ``str.split()`` words (one call per line)
* ``distinct``: keys reduced; ``seen once``: keys whose count is 1
"""

from __future__ import annotations

from collections.abc import Iterator

from kubemr_async import Job, TaskContext
from tests.jobs.attempts import record

job = Job("counting")


def fail_first_attempt(ctx: TaskContext) -> None:
    chosen = ctx.args.get("fail", "")
    if ctx.attempt == 1 and (chosen == "all" or ctx.task in chosen.split(",")):
        record(ctx)
        raise RuntimeError(f"{ctx.task} fails its first attempt on purpose")


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
